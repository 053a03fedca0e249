"""The generation loop: one prefill, then one token per step from a preallocated KV cache.

Prompts of different lengths share a batch by left padding (the cache tracks which slots are real
and each row's next position, so a row decodes exactly as it would alone). `n` samples of a prompt
share its prefill: the cache rows are copied after it. Each step runs `Transformer.decode_step`,
the fixed-shape one-token forward pass, optionally through `torch.compile` (with a clean eager
fallback when compiling fails). Sequences end on EOS, a stop token, a stop string (matched on the
text, see text.py), `max_new_tokens` or the model's context.

`run` is the token-level core and yields `Chunk`s as tokens are generated; `complete` collects
them into `Completion`s. Its pieces -- `make_sequences` (a request's rows and sampling state),
`prefill` and `sample_next` (processors, draw, raw logprobs, bookkeeping) -- are also what the
server's continuous-batching scheduler (llmkit/serve/scheduler.py) steps with, so both loops
sample the same tokens for the same request.
"""

from __future__ import annotations

import types
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llmkit.data.collate import pad_batch, pad_tokens
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
    prompt_top_logprobs: list[dict[int, float] | None] | None = None  # with echo and logprobs=k
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


def check_token_fields(params: SamplingParams, vocab_size: int) -> None:
    """The sampling fields that name token ids must name this model's, or sampling fails mid-batch."""
    def check(ok: bool, name: str, value) -> None:
        if not ok:
            raise ConfigError(f"{name}={value} is invalid; expected token ids in [0, {vocab_size})", param=name)

    bad = [t for t in params.stop_token_ids or [] if t >= vocab_size]
    check(not bad, "stop_token_ids", bad[:3])
    bad = [k for k in params.logit_bias or {} if int(k) >= vocab_size]
    check(not bad, "logit_bias", bad[:3])
    if params.logprobs is not None and params.logprobs > vocab_size:
        raise ConfigError(f"logprobs={params.logprobs} is invalid; expected at most the vocabulary size {vocab_size}",
                          param="logprobs")


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
    """(input_ids, attention_mask), both (batch, longest prompt), padded on the left, on `device`."""
    ids, mask = pad_batch(prompts, pad_id, left=True)
    return ids.to(device), mask.to(device)


# ---- the decode step, compiled when possible --------------------------------------------------

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Batches up to this many rows decode through the compiled step. Above it a step is bound by its GEMMs
# and eager is as fast (SmolLM2 int4, 2 cores: 813 vs 804 tok/s at 32 rows, 1,207 vs 961 at 64), and
# each batch class compiled costs ~1 min; at 1-8 rows compiling saves 1.5-4 ms of a 6-16 ms step.
COMPILED_ROWS = 16


def _own_decode_step(model: Transformer):
    """`model.decode_step` bound to a copy of the function with its own code object. Dynamo keeps
    compiled graphs and their guards per code object; with module guards skipped, models sharing one
    would run each other's graphs (a quantized model the fp32 model's, which fails into eager)."""
    f = type(model).decode_step
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    own.__kwdefaults__ = f.__kwdefaults__
    return types.MethodType(own, model)


def _module_ids(model: Transformer) -> tuple[int, ...]:
    """Which modules `model` is made of now: swapping any (quantize, LoRA) changes it, and the compiled
    step, which does not re-check its modules, is compiled again."""
    return tuple(map(id, model.modules()))


class DecodeStep:
    """One token per row through the model, advancing the KV cache by one slot.

    Eagerly it is `model.forward` on the cache (attention reads only the slots filled so far).
    With `compile=True` it is `model.decode_step`, the fixed-shape variant, through `torch.compile`
    with dynamic shapes: one graph serves every cache length and one every batch of 2 to
    `COMPILED_ROWS` rows (dynamo specialises a batch of one, so that is a second graph); larger
    batches run eagerly. The compiled function is kept per model, so later calls reuse it. A failure
    (no C++ compiler, an unsupported operation, ...) warns once and falls back to eager: the static
    step writes its cache slot with `index_copy_`, so running the step again is harmless.
    `static=True` without compiling runs the fixed-shape step eagerly (tests compare it with the
    dynamic one).
    """

    def __init__(self, model: Transformer, compile: bool = False, static: bool | None = None):
        self.model = model
        self.static = compile if static is None else static
        self.compiled = None
        if compile:
            modules = _module_ids(model)
            if _COMPILED.get(model, (None,))[0] != modules:
                try:
                    # Guards on the model's modules are skipped: checking them costs ~1 ms a step;
                    # a model whose modules were swapped is compiled again (_module_ids), and each
                    # model compiles its own copy of the step, so no other model's graph matches.
                    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
                    if model.device.type == "cpu":  # call the step's ~300 kernels from C++, not Python
                        options["cpp_wrapper"] = True
                    compiled = torch.compile(_own_decode_step(model), dynamic=True, options=options)
                except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
                    warnings.warn(f"torch.compile is unavailable ({type(e).__name__}: {e}); decoding eagerly",
                                  stacklevel=2)
                    compiled = None
                _COMPILED[model] = (modules, compiled)
            self.compiled = _COMPILED[model][1]

    def warm_up(self, max_rows: int) -> None:
        """Compile now the graphs that batches of up to `max_rows` rows will use (a server does this
        before it listens, as vLLM captures its CUDA graphs, so no request waits for the compiler)."""
        with torch.inference_mode():  # as decoding runs: a guard tells inference tensors from others
            for rows in sorted({1, min(2, max_rows)}):
                cache = KVCache(self.model.config, rows, 2, device=self.model.device, dtype=self.model.dtype)
                self(torch.zeros(rows, dtype=torch.long, device=self.model.device), cache)

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (batch, vocab) for one new token per row (`tokens`, shape (batch,))."""
        # Rows that have ended keep stepping until the batch ends; keep their positions in range.
        positions = cache.next_position.clamp(max=self.model.config.max_seq_len - 1)[:, None]
        many = self.compiled is not None and tokens.shape[0] > COMPILED_ROWS  # eager is as fast there
        if not self.static or many:
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
                _COMPILED[self.model] = (_module_ids(self.model), None)
                self.compiled = None
        if logits is None:
            logits = self.model.decode_step(*args)
        cache.length = slot + 1
        cache.next_position += 1
        return logits[:, -1]


# ---- the loop --------------------------------------------------------------------------------


class Sequence:
    """One generated row: its request's sampling state (params, generator, tokens seen so far) and
    its output. The engine's loop and the server's continuous-batching scheduler both step rows
    through `sample_next`, so a row samples the same tokens whichever loop runs it."""

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, tokenizer, limit: int,
                 eos_ids: set[int], vocab_size: int, generator: torch.Generator | None = None, device=None):
        self.params, self.generator, self.eos_ids = params, generator, eos_ids
        self.eos_list = sorted(eos_ids)
        self.out = Completion(index=index, prompt_token_ids=prompt)
        if params.logprobs is not None:
            self.out.logprobs, self.out.top_logprobs = [], []
        self.text = TextTracker(tokenizer, params.stop_strings) if tokenizer is not None else None
        self.limit = limit  # new tokens this row may still take (max_new_tokens, or the context)
        self.seen = self.counts = None  # prompt + generated tokens (repetition), generated counts (OpenAI)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[prompt] = True
        if params.frequency_penalty or params.presence_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.long, device=device)

    @property
    def done(self) -> bool:
        return self.out.finish_reason is not None

    def add(self, token: int, logprob: float | None, top: dict[int, float] | None) -> Chunk:
        out = self.out
        out.token_ids.append(token)
        if out.logprobs is not None:
            out.logprobs.append(logprob)
            out.top_logprobs.append(top)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        is_eos = token in self.eos_ids
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

    def end(self, finish_reason: str) -> None:
        """End the row from outside (no new token), e.g. when its request is cancelled."""
        self.out.finish_reason = finish_reason
        if self.text is not None:
            self.text.finish()
            self.out.text = self.text.text


def make_sequences(model: Transformer, prompt: list[int], params: SamplingParams, tokenizer, first_index: int,
                   eos_ids: set[int]) -> list[Sequence]:
    """The `n` rows of one request; sample i draws from seed + i, whatever shares its batch."""
    check_token_fields(params, model.config.vocab_size)
    limit = min(params.max_new_tokens, model.config.max_seq_len - len(prompt))
    generators = make_generators(params.seed, params.n, model.device)
    return [Sequence(first_index + i, list(prompt), params, tokenizer, limit, eos_ids, model.config.vocab_size,
                     generators[i], model.device) for i in range(params.n)]


@torch.inference_mode()
def sample_next(logits: torch.Tensor, seqs: list[Sequence],
                errors: dict[int, Exception] | None = None) -> tuple[torch.Tensor, list[Chunk]]:
    """The sampling step of every decoding loop: each live row's next token and its `Chunk` (in row order).

    `logits` (rows, vocab) are the model's. Raw logprobs come from one log-softmax before any
    processor, so a chosen token's logprob equals its entry in the top logprobs exactly. Rows with the
    same params and as many generated tokens share one pass through the processors; each row draws
    with its own generator. Finished rows get token 0 (they are only kept to fill the batch).

    With `errors` (the server), a group whose sampling raises is isolated: its rows end with
    finish_reason "error" and get no chunk, `errors[row]` holds the exception, and every other row
    advances exactly as it would alone (no generator drawn twice, no token added twice).
    """
    tokens = torch.zeros(len(seqs), dtype=torch.long, device=logits.device)
    groups: dict[tuple[int, int], list[int]] = {}
    for r, s in enumerate(seqs):
        if not s.done:
            groups.setdefault((id(s.params), len(s.out.token_ids)), []).append(r)
    chunks: dict[int, Chunk] = {}
    for (_, n_generated), rows in groups.items():
        try:
            chunks.update(_sample_group(logits, seqs, rows, n_generated, tokens))
        except Exception as e:
            if errors is None:
                raise
            for r in rows:
                errors[r] = e
                seqs[r].end("error")
    return tokens, [chunks[r] for r in sorted(chunks)]


def _sample_group(logits: torch.Tensor, seqs: list[Sequence], rows: list[int], n_generated: int,
                  tokens: torch.Tensor) -> dict[int, Chunk]:
    """Rows that share params and step: process, draw, then (only once all succeeded) record."""
    first = seqs[rows[0]]
    params = first.params
    idx = torch.tensor(rows, device=logits.device)
    own = logits.index_select(0, idx)
    seen = torch.stack([seqs[r].seen for r in rows]) if first.seen is not None else None
    counts = torch.stack([seqs[r].counts for r in rows]) if first.counts is not None else None
    processed = process_logits(own, params, prompt_and_generated=seen, generated_counts=counts,
                               n_generated=n_generated, eos_ids=first.eos_list)
    generators = [seqs[r].generator for r in rows] if params.seed is not None else None
    picked = sample(processed, params, generators)
    chosen = tops = [None] * len(rows)
    picked_list = picked.tolist()
    k = params.logprobs
    if k is not None:
        lp = raw_logprobs(own)
        chosen = lp.gather(-1, picked[:, None])[:, 0].tolist()
        tops = [_top(row, k) for row in lp]
    tokens[idx] = picked
    return {r: seqs[r].add(t, c, top) for r, t, c, top in zip(rows, picked_list, chosen, tops, strict=True)}


def _top(logprobs: torch.Tensor, k: int) -> dict[int, float]:
    if k == 0:
        return {}
    v, i = logprobs.topk(k)
    return dict(zip(i.tolist(), v.tolist(), strict=True))


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> tuple[list[float], list[dict]]:
    """The raw logprob of each target token under the logits row before it, and the top k there;
    row i of `logits` predicts `targets[i]` (extra rows are ignored)."""
    lp = raw_logprobs(logits[:len(targets)])
    chosen = lp.gather(-1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
    return chosen, [_top(row, k) for row in lp]


class PromptFill:
    """One prompt run into its own one-row KV cache a chunk at a time (chunked prefill): a scheduler
    interleaves a long prompt with the decode steps of running rows instead of stalling them for the
    whole prompt. A `cache` that already holds a prefix of the prompt (a prefix-cache hit) is continued.
    With echo, the prompt's logprobs are gathered chunk by chunk (never a prompt x vocabulary tensor)."""

    def __init__(self, model: Transformer, prompt: list[int], seqs: list[Sequence], cache: KVCache | None = None):
        self.model, self.prompt, self.seqs = model, prompt, seqs
        self.cache = cache  # made at the first chunk: a scheduler may prefill the prompt in a batch instead
        self.done = 0 if cache is None else cache.length  # prompt tokens in the cache
        self.echo = seqs[0].params.echo
        self.logprobs: list[float | None] = [None]
        self.tops: list[dict | None] = [None]

    @torch.inference_mode()
    def advance(self, budget: int) -> torch.Tensor | None:
        """Run up to `budget` more prompt tokens; returns the last position's logits (1, vocab) when
        the whole prompt is in the cache, else None."""
        if self.cache is None:
            self.cache = KVCache(self.model.config, 1, len(self.prompt), device=self.model.device,
                                 dtype=self.model.dtype)
        end = min(len(self.prompt), self.done + max(budget, 1))
        ids = torch.tensor([self.prompt[self.done:end]], device=self.model.device)
        hidden = self.model.hidden_states(ids, kv_cache=self.cache)
        if self.echo:
            logits = self.model.logits(hidden)[0]
            lps, tops = prompt_logprobs(logits, self.prompt[self.done + 1:end + 1], self.seqs[0].params.logprobs or 0)
            self.logprobs += lps
            self.tops += tops
            last = logits[-1:]
        else:
            last = self.model.logits(hidden[:, -1])
        self.done = end
        if end < len(self.prompt):
            return None
        for s in self.seqs:
            if self.echo:
                s.out.prompt_logprobs, s.out.prompt_top_logprobs = self.logprobs, self.tops
        return last

    def rows(self, last: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
        """The finished cache and logits copied to one row per sample (`n` samples share the prefill)."""
        n = len(self.seqs)
        if n > 1:
            self.cache.reorder(torch.zeros(n, dtype=torch.long, device=self.model.device))
            last = last.expand(n, -1)
        return self.cache, last


@torch.inference_mode()
def prefill(model: Transformer, prompts: list[list[int]], seqs: list[Sequence], extra_slots: int) -> tuple[KVCache, torch.Tensor]:
    """Run the prompts (left-padded together) into a new KV cache with `extra_slots` free slots.

    Returns the cache and each row's next-token logits, with the rows of `seqs` (len(seqs) is a
    multiple of len(prompts): each prompt's samples share its prefill, the cache rows are copied).
    With echo, the rows' prompt logprobs are filled in.
    """
    n = len(seqs) // len(prompts)
    config = model.config
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad_id, model.device)
    cache = KVCache(config, len(prompts), ids.shape[1] + extra_slots, device=model.device, dtype=model.dtype)
    hidden = model.hidden_states(ids, mask, kv_cache=cache)
    echo = seqs[0].params.echo
    if echo:
        full = model.logits(hidden)
        k = seqs[0].params.logprobs or 0
        for p, prompt in enumerate(prompts):
            lps, tops = prompt_logprobs(full[p, ids.shape[1] - len(prompt):], prompt[1:], k)
            for s in seqs[p * n:(p + 1) * n]:
                s.out.prompt_logprobs, s.out.prompt_top_logprobs = [None, *lps], [None, *tops]
        logits = full[:, -1]
    else:
        logits = model.logits(hidden[:, -1])
    if n > 1:
        expand = torch.arange(len(prompts), device=model.device).repeat_interleave(n)
        cache.reorder(expand)
        logits = logits.index_select(0, expand)
    return cache, logits


@torch.inference_mode()
def run(model: Transformer, prompts: list[list[int]], params: SamplingParams, tokenizer=None, *,
        compile: bool = False, sequences: list[Completion] | None = None) -> Iterator[Chunk]:
    """Generate after each prompt (lists of token ids), yielding a `Chunk` per token as it comes.

    Pass a list as `sequences` to receive the `Completion`s (filled in as the loop runs).
    """
    check_prompts(model, prompts)
    if params.stop_strings and tokenizer is None:
        raise ConfigError("stop strings are matched on text, so they need a tokenizer; got none")
    eos_ids = set(eos_token_ids(model, tokenizer, params))
    seqs = [s for p, prompt in enumerate(prompts)
            for s in make_sequences(model, prompt, params, tokenizer, p * params.n, eos_ids)]
    if sequences is not None:
        sequences.extend(s.out for s in seqs)
    steps = max(s.limit for s in seqs)
    if steps == 0:
        if params.echo:  # log-likelihood scoring asks for the prompt's logprobs and no new token
            prefill(model, prompts, seqs, 0)
        for s in seqs:
            s.end("length")
        return

    cache, logits = prefill(model, prompts, seqs, steps)
    step_fn = DecodeStep(model, compile)
    for _ in range(steps):
        tokens, chunks = sample_next(logits, seqs)
        yield from chunks
        if all(s.done for s in seqs):
            break
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


# ---- tensors in, tensors out (transformers' `model.generate`) --------------------------------------------


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
    new = pad_tokens([o.token_ids for o in outs], pad)
    rep = params.n
    return torch.cat([input_ids.cpu().repeat_interleave(rep, dim=0), new], dim=1).to(input_ids.device)
