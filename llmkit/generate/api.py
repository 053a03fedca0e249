"""`llmkit.generate` and `llmkit.stream`: text or token ids in, completions out.

Both take the same arguments: the model, a tokenizer (anything with llmkit's `Tokenizer` contract:
`encode`, `decode`, `eos_id`), a prompt, and the sampling arguments of `SamplingParams`, named as in
the OpenAI API (max_new_tokens, temperature, top_p, top_k, min_p, frequency_penalty,
presence_penalty, repetition_penalty, logit_bias, stop, seed, n, ignore_eos, logprobs, echo) plus
num_beams / length_penalty / early_stopping for beam search and `compile` for a compiled decode step.
"""

from __future__ import annotations

from collections.abc import Iterator

from llmkit.errors import ConfigError
from llmkit.generate.engine import Chunk, Completion, complete, run
from llmkit.generate.sampling import SamplingParams

Prompt = str | list[int]


def prompt_ids(tokenizer, prompt, encode=None) -> tuple[list[list[int]], bool]:
    """A prompt argument (text, token ids, or a list of either) as token id lists, and whether a single
    prompt was given: how `llmkit.generate` and the server's completions read prompts. `encode` turns
    a text into ids (default: the tokenizer's, with its special tokens)."""
    def one(p) -> list[int]:
        if isinstance(p, str):
            if encode is not None:
                return list(encode(p))
            if tokenizer is None:
                raise ConfigError("a text prompt needs a tokenizer; got tokenizer=None (pass token ids instead)")
            return list(tokenizer.encode(p, add_special_tokens=True))
        if isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p)
        raise ConfigError(f"prompt must be a string or a list of token ids, got {type(p).__name__}", param="prompt")

    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                   and all(isinstance(t, int) for t in prompt)):
        return [one(prompt)], True
    if isinstance(prompt, (list, tuple)) and prompt:
        return [one(p) for p in prompt], False
    raise ConfigError(f"prompt {prompt!r} is empty; expected text, token ids, or a list of either", param="prompt")


def _split(sampling: dict) -> tuple[SamplingParams, bool]:
    compile = bool(sampling.pop("compile", False))
    try:
        return SamplingParams(**sampling), compile
    except TypeError as e:  # an unknown keyword
        raise ConfigError(f"unknown sampling argument: {e}") from None


def generate(model, tokenizer, prompt: Prompt | list[Prompt], **sampling) -> Completion | list[Completion]:
    """Complete `prompt` (text or token ids).

    One prompt with n=1 gives one `Completion` (.text, .token_ids, .logprobs, .finish_reason);
    a list of prompts, or n > 1, gives a list, prompt-major (prompt p, sample i at p * n + i).
    """
    prompts, single = prompt_ids(tokenizer, prompt)
    params, compile = _split(sampling)
    outs = complete(model, prompts, params, tokenizer, compile=compile)
    return outs[0] if single and params.n == 1 and len(outs) == 1 else outs


def stream(model, tokenizer, prompt: Prompt | list[Prompt], **sampling) -> Iterator[Chunk]:
    """Like `generate`, but yields a `Chunk` per generated token as soon as it exists.

    Joining the `.text` of a sequence's chunks gives exactly its final text: a chunk never ends in
    half a UTF-8 character or in what may become a stop string (such text comes in a later chunk).
    """
    prompts, _ = prompt_ids(tokenizer, prompt)
    params, compile = _split(sampling)
    if params.num_beams > 1:
        raise ConfigError("beam search cannot stream (the best beam is known only at the end); "
                          "use generate() with num_beams > 1")
    yield from run(model, prompts, params, tokenizer, compile=compile)
