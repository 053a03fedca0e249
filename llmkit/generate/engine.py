"""The generation loop: one prefill, then one token per step from a preallocated KV cache.

Prompts of different lengths share a batch by left padding (the cache tracks which slots are real
and each row's next position, so a row decodes exactly as it would alone). `n` samples of a prompt
share its prefill: the cache rows are copied after it. Each step runs `Transformer.decode_step`,
the fixed-shape one-token forward pass, optionally through `torch.compile` (with a clean eager
fallback when compiling fails). Sequences end on EOS, a stop token, a stop string (matched on the
text, see text.py), `max_new_tokens` or the model's context.

`run` is the token-level core and yields `Chunk`s as tokens are generated; `complete` collects
them into `Completion`s.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llmkit.errors import ConfigError
from llmkit.generate.sampling import SamplingParams, make_generators, process_logits, raw_logprobs, sample
from llmkit.generate.text import TextTracker
from llmkit.model import KVCache, Transformer


@dataclass
class Chunk:
    """One generated token of sequence `index`, as streamed."""

    index: int  # which sequence: prompt p, sample i is index p * n + i
    token_id: int
    text: str  # the text this token made safe to show ("" while it is held back)
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # set on a sequence's last chunk: "stop" or "length"


@dataclass
class Completion:
    """A finished sequence: generated tokens (an EOS or stop token included), text, and why it ended."""

    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None  # None when no tokenizer was given
    logprobs: list[float] | None = None  # raw logprob of each generated token
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None  # with echo: the first prompt token has none
    finish_reason: str | None = None
    score: float | None = None  # beam search: the length-penalised sum of logprobs


# ---- input checks ----------------------------------------------------------------------------


def check_prompts(model: Transformer, prompts: list[list[int]]) -> None:
    context = model.config.max_seq_len
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise ConfigError(f"prompt {i} is empty; expected at least one token (e.g. the BOS token)")
        if len(ids) >= context:
            raise ConfigError(f"prompt {i} has {len(ids)} tokens, which leaves no room in the model's "
                              f"context of {context} tokens; expected at most {context - 1}")
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ConfigError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                              f"[0, {model.config.vocab_size})")


def eos_token_ids(model: Transformer, tokenizer=None, params: SamplingParams | None = None) -> list[int]:
    """Token ids that end a sequence: the tokenizer's and the config's EOS, plus stop_token_ids."""
    ids: list[int] = []
    if params is None or not params.ignore_eos:
        eos = model.config.eos_token_id
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
            ids.append(tokenizer.eos_id)
    if params is not None and params.stop_token_ids:
        ids += list(params.stop_token_ids)
    return sorted(set(ids))


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest prompt), padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


# ---- the decode step, compiled when possible --------------------------------------------------

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class DecodeStep:
    """One token per row through the model, advancing the KV cache by one slot.

    Eagerly it is `model.forward` on the cache (attention reads only the slots filled so far).
    With `compile=True` it is `model.decode_step`, the fixed-shape variant, through `torch.compile`;
    the compiled function is kept per model, so later calls reuse it. A failure (no C++ compiler,
    an unsupported operation, ...) warns once and falls back to eager: the static step writes its
    cache slot with `index_copy_`, so running the step again is harmless. `static=True` without
    compiling runs the fixed-shape step eagerly (tests compare it with the dynamic one).
    """

    def __init__(self, model: Transformer, compile: bool = False, static: bool | None = None):
        self.model = model
        self.static = compile if static is None else static
        self.compiled = None
        if compile:
            if model not in _COMPILED:
                try:
                    _COMPILED[model] = torch.compile(model.decode_step, dynamic=False)
                except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
                    warnings.warn(f"torch.compile is unavailable ({type(e).__name__}: {e}); decoding eagerly",
                                  stacklevel=2)
                    _COMPILED[model] = None
            self.compiled = _COMPILED[model]

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (batch, vocab) for one new token per row (`tokens`, shape (batch,))."""
        # Rows that have ended keep stepping until the batch ends; keep their positions in range.
        positions = cache.next_position.clamp(max=self.model.config.max_seq_len - 1)[:, None]
        if not self.static:
            return self.model(tokens[:, None], positions=positions, kv_cache=cache)[:, -1]
        slot = cache.length
        cache.valid[:, slot] = True
        args = (tokens[:, None], positions, torch.tensor(slot, device=tokens.device), cache.valid, cache)
        logits = None
        if self.compiled is not None:
            try:
                logits = self.compiled(*args)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"the compiled decode step failed ({type(e).__name__}: {e}); decoding eagerly",
                              stacklevel=2)
                _COMPILED[self.model] = self.compiled = None
        if logits is None:
            logits = self.model.decode_step(*args)
        cache.length = slot + 1
        cache.next_position += 1
        return logits[:, -1]


# ---- the loop --------------------------------------------------------------------------------


class _Sequence:
    """Book-keeping of one row: its tokens, logprobs, text and whether it has ended."""

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, tokenizer, limit: int):
        self.out = Completion(index=index, prompt_token_ids=prompt)
        if params.logprobs is not None:
            self.out.logprobs, self.out.top_logprobs = [], []
        self.text = TextTracker(tokenizer, params.stop_strings) if tokenizer is not None else None
        self.limit = limit  # new tokens this row may still take (max_new_tokens, or the context)

    @property
    def done(self) -> bool:
        return self.out.finish_reason is not None

    def add(self, token: int, logprob, top, eos_ids) -> Chunk:
        out = self.out
        out.token_ids.append(token)
        if out.logprobs is not None:
            out.logprobs.append(logprob)
            out.top_logprobs.append(top)
        is_eos = token in eos_ids
        text = ""
        if self.text is not None:
            text = self.text.push(None if is_eos else token)
        if is_eos or (self.text is not None and self.text.stopped):
            out.finish_reason = "stop"
        elif len(out.token_ids) >= self.limit:
            out.finish_reason = "length"
        if self.done and self.text is not None:
            text += self.text.finish()
            out.text = self.text.text
        return Chunk(out.index, token, text, logprob, top, out.finish_reason)


def _prompt_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> list[list[float | None]]:
    """Each real prompt token's logprob given the tokens before it (None for the first)."""
    lp = raw_logprobs(logits[:, :-1]).gather(-1, ids[:, 1:, None])[..., 0]
    rows = []
    for r in range(ids.shape[0]):
        real = mask[r].bool()
        start = int((~real).sum())
        rows.append([None] + lp[r, start:].tolist())
    return rows


@torch.inference_mode()
def run(model: Transformer, prompts: list[list[int]], params: SamplingParams, tokenizer=None, *,
        compile: bool = False, sequences: list[Completion] | None = None) -> Iterator[Chunk]:
    """Generate after each prompt (lists of token ids), yielding a `Chunk` per token as it comes.

    Pass a list as `sequences` to receive the `Completion`s (filled in as the loop runs).
    """
    check_prompts(model, prompts)
    if params.stop_strings and tokenizer is None:
        raise ConfigError("stop strings are matched on text, so they need a tokenizer; got none")
    device, config = model.device, model.config
    eos_ids = set(eos_token_ids(model, tokenizer, params))
    context = config.max_seq_len
    n = params.n
    rows = [p for p in prompts for _ in range(n)]
    seqs = [_Sequence(i, list(p), params, tokenizer, min(params.max_new_tokens, context - len(p)))
            for i, p in enumerate(rows)]
    if sequences is not None:
        sequences.extend(s.out for s in seqs)
    steps = max(s.limit for s in seqs)
    if steps == 0:
        for s in seqs:
            s.out.finish_reason, s.out.text = "length", "" if tokenizer is not None else None
        return

    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad_id, device)
    cache = KVCache(config, len(prompts), ids.shape[1] + steps, device=device, dtype=model.dtype)
    hidden = model.hidden_states(ids, mask, kv_cache=cache)
    if params.echo:
        full = model.lm_head(hidden)
        for s, lps in zip(seqs, [r for r in _prompt_logprobs(full, ids, mask) for _ in range(n)], strict=True):
            s.out.prompt_logprobs = lps
        logits = full[:, -1]
    else:
        logits = model.lm_head(hidden[:, -1])
    if n > 1:
        expand = torch.arange(len(prompts), device=device).repeat_interleave(n)
        cache.reorder(expand)
        logits = logits.index_select(0, expand)

    vocab = logits.shape[-1]
    seen = counts = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
        for r, p in enumerate(rows):
            seen[r, p] = True
    if params.frequency_penalty or params.presence_penalty:
        counts = torch.zeros(len(rows), vocab, dtype=torch.long, device=device)
    # Each prompt is its own request: its sample i draws from seed + i, whatever shares the batch.
    generators = None
    if params.seed is not None:
        generators = [g for _ in prompts for g in make_generators(params.seed, n, device)]
    step_fn = DecodeStep(model, compile)
    eos_list = sorted(eos_ids)

    for step in range(steps):
        lp = raw_logprobs(logits) if params.logprobs is not None else None
        processed = process_logits(logits, params, prompt_and_generated=seen, generated_counts=counts,
                                   n_generated=step, eos_ids=eos_list)
        tokens = sample(processed, params, generators)
        token_list = tokens.tolist()
        chosen = tops = None
        if lp is not None:
            chosen = lp.gather(-1, tokens[:, None])[:, 0].tolist()
            if params.logprobs > 0:
                v, i = lp.topk(params.logprobs, dim=-1)
                tops = [dict(zip(ii, vv, strict=True)) for ii, vv in zip(i.tolist(), v.tolist(), strict=True)]
        for r, s in enumerate(seqs):
            if not s.done:
                yield s.add(token_list[r], chosen[r] if chosen else None,
                            tops[r] if tops else ({} if lp is not None else None), eos_ids)
        if all(s.done for s in seqs):
            break
        if seen is not None:
            seen[torch.arange(len(rows), device=device), tokens] = True
        if counts is not None:
            counts[torch.arange(len(rows), device=device), tokens] += 1
        logits = step_fn(tokens, cache)


def complete(model: Transformer, prompts: list[list[int]], params: SamplingParams, tokenizer=None, *,
             compile: bool = False) -> list[Completion]:
    """Run generation to the end; one `Completion` per (prompt, sample), prompt-major."""
    if params.num_beams > 1:
        from llmkit.generate.beam import beam_search

        return beam_search(model, prompts, params, tokenizer)
    out: list[Completion] = []
    for _ in run(model, prompts, params, tokenizer, compile=compile, sequences=out):
        pass
    return out


# ---- tensors in, tensors out (Transformer.generate) --------------------------------------------


def generate_tensor(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    compile: bool = False, **sampling) -> torch.Tensor:
    """transformers-style: (batch * n, prompt + new) ids, right-padded with the pad (or EOS) id."""
    if input_ids.dim() != 2:
        raise ConfigError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
    params = SamplingParams(**sampling)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), mask.cpu(), strict=True)]
    outs = complete(model, prompts, params, compile=compile)
    eos = model.config.eos_token_id
    pad = model.config.pad_token_id
    if pad is None:
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    width = max(len(o.token_ids) for o in outs)
    new = torch.full((len(outs), width), pad, dtype=torch.long)
    for i, o in enumerate(outs):
        new[i, :len(o.token_ids)] = torch.tensor(o.token_ids, dtype=torch.long)
    rep = params.n
    return torch.cat([input_ids.cpu().repeat_interleave(rep, dim=0), new], dim=1).to(input_ids.device)
