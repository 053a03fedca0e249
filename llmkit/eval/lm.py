"""The two requests every evaluation reduces to, computed the way lm-evaluation-harness does.

- `loglikelihood_tokens`: for (context ids, continuation ids) pairs, the summed log-probability of
  the continuation and whether greedy decoding would have produced it. Batched (right-padded, so
  causal attention never sees the padding), longest first, under a tqdm bar.
- `generate_until`: greedy continuations of text prompts, cut at the first stop string.

`encode_pair` and `prefix_token_id` copy lm-eval's rules (`TemplateLM._encode_pair`, HFLM's
`prefix_token_id`), so a task scored here and through `lm_eval --model hf` sees the same tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from llmkit.data.collate import pad_batch, pad_tokens
from llmkit.errors import ConfigError
from llmkit.generate.engine import complete
from llmkit.generate.sampling import SamplingParams
from llmkit.model import SLIDING, KVCache

_LOGIT_ROWS = 512  # positions per LM-head chunk: keeps (rows, vocab) float32 logits small
_PREFILL_SCORES = 1 << 26  # rows x length^2 of one forward's batch (bounds the attention memory)
_BATCH_TOKENS = 4096  # rows x padded length of one scoring forward: long prompts go a few at a time
_SHARED_MIN = 64  # tokens that prompts must start with in common before that start runs once for them all


def prefix_token_id(tokenizer) -> int:
    """The token a context-free request conditions on: BOS if the tokenizer has one, else EOS."""
    token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")
    return token


def encode(tokenizer, text: str) -> list[int]:
    """Token ids as lm-eval's HF model encodes text: with the tokenizer's own special tokens (a BOS
    where its post-processor adds one; none for SmolLM2 or GPT-2), unless the text already starts
    with the BOS token (a rendered chat template)."""
    bos = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else None
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces move to the continuation, the whole string is encoded once and
    the continuation is what follows the context's tokens; an empty context becomes the prefix token."""
    if not context:
        return [prefix_token_id(tokenizer)], encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def context_length(model, max_length: int | None = None) -> int:
    """The window a request is scored in: `max_length` if given, else the model's context. Every scoring
    path asks for it first, so an encoder (which sees the token it would predict) is refused here."""
    if not getattr(model.config, "causal", True):
        raise ConfigError("this model is an encoder (causal=False): log-likelihoods and perplexity need a causal LM "
                          "(an encoder sees the token it would predict)")
    return max_length or model.config.max_seq_len


def _score(model, hidden: torch.Tensor, rows: list[int], targets: list[int],
           lengths: list[int]) -> list[tuple[float, bool]]:
    """(summed log-prob, all greedy) of consecutive runs of `lengths` targets; `hidden[rows[k]]` predicts
    `targets[k]` (rows ascending). A row several requests score (the four one-token choices of a question)
    goes through the LM head once."""
    row, target = torch.tensor(rows, device=hidden.device), torch.tensor(targets, device=hidden.device)
    edges = torch.searchsorted(row, torch.arange(0, len(hidden) + _LOGIT_ROWS, _LOGIT_ROWS, device=hidden.device))
    logprob, greedy = [], []
    for k, s in enumerate(range(0, len(hidden), _LOGIT_ROWS)):
        lp = torch.log_softmax(model.logits(hidden[s:s + _LOGIT_ROWS]).float(), dim=-1)
        r, t = row[edges[k]:edges[k + 1]] - s, target[edges[k]:edges[k + 1]]
        logprob.append(lp[r, t])
        greedy.append(lp.argmax(-1)[r] == t)
    logprob_all, greedy_all = torch.cat(logprob).double(), torch.cat(greedy)
    out, offset = [], 0
    for n in lengths:
        out.append((float(logprob_all[offset:offset + n].sum()), bool(greedy_all[offset:offset + n].all())))
        offset += n
    return out


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _clusters(prefixes: list[tuple[int, ...]], share: bool) -> list[tuple[tuple[int, ...], list[tuple[int, ...]]]]:
    """(shared tokens, prefixes) to run together: runs of prefixes that start with the same `_SHARED_MIN`
    tokens or more (a few-shot prompt's exemplars) share those tokens, the rest none; each longest first."""
    order, out, alone = sorted(prefixes), [], []
    start = 0
    while start < len(order):
        end = start + 1  # in lexicographic order the run's common start is that of its first and last
        while share and end < len(order) and _common_length(order[start], order[end]) >= _SHARED_MIN:
            end += 1
        run = order[start:end]
        if len(run) > 1:  # every prefix keeps a token of its own, so each row has something to run
            common = min(_common_length(run[0], run[-1]), min(map(len, run)) - 1)
            out.append((run[0][:common], sorted(run, key=len, reverse=True)))
        else:
            alone.extend(run)
        start = end
    return out + [((), sorted(alone, key=len, reverse=True))] if alone else out


def _tail_states(model, cache: KVCache, rests: list[tuple[int, ...]], tails: list[list[tuple[int, ...]]]):
    """Hidden states of every tail: each prefix's `rests` (left-padded, after what `cache` holds), then
    each of its tails on its own copy of the prefix's row (right-padded: causal attention never sees it)."""
    device = model.device
    if any(rests):
        ids, mask = pad_batch(rests, 0, left=True)
        model.hidden_states(ids.to(device), mask.to(device), kv_cache=cache)
    flat = [t for ts in tails for t in ts]
    if len(flat) > len(tails):  # a row per tail (one-token choices share one: nothing to copy)
        cache.reorder(torch.tensor([r for r, ts in enumerate(tails) for _ in ts]))
    hidden = model.hidden_states(pad_tokens(flat, 0).to(device), kv_cache=cache)
    return [hidden[r, :len(t)] for r, t in enumerate(flat)]


@torch.inference_mode()
def loglikelihood_tokens(model, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                         progress: bool = True, desc: str = "loglikelihood",
                         max_length: int | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), is greedy) per request, in the order given.

    Like lm-eval, the model reads the last `max_length + 1` tokens of context + continuation minus the
    final one, so a context longer than the window is left-truncated. Each input splits into a prefix
    (before the first scored position) and a tail. Nothing runs twice that need not: the choices of one
    question share their prefix, one-token choices their tail too (one row scores A, B, C and D); prefixes
    that start alike (a subject's few-shot exemplars) run that start once into a KV cache that their
    batches copy. Batches are at most `batch_size` prefixes of alike length.
    """
    limit = context_length(model, max_length)
    tails: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if len(cont) > limit:
            raise ConfigError(f"a continuation of {len(cont)} tokens does not fit the {limit}-token window")
        ids = (list(ctx) + list(cont))[-(limit + 1):][:-1]
        cut = len(ids) - len(cont)
        tails.setdefault(tuple(ids[:cut]), {}).setdefault(tuple(ids[cut:]), []).append(i)
    # a sliding-window layer masks by cache slot: padding between shared and own tokens would move its window
    share = SLIDING not in model.kind_layers.values()
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    device, config = model.device, model.config
    with tqdm(total=len(requests), desc=desc, disable=not progress, leave=False) as bar:
        for shared, prefixes in _clusters(list(tails), share):
            common = None
            if shared:
                common = KVCache(config, 1, len(shared), device=device, dtype=model.dtype)
                model.hidden_states(torch.tensor([shared], device=device), kv_cache=common)
            start = 0
            while start < len(prefixes):
                longest = len(prefixes[start]) - len(shared) + max(map(len, tails[prefixes[start]]))
                batch = prefixes[start:start + max(1, min(batch_size, _BATCH_TOKENS // longest))]
                start += len(batch)
                groups = [list(tails[p]) for p in batch]
                room = max(len(p) for p in batch) - len(shared) + max(len(t) for g in groups for t in g)
                cache = (KVCache.stack([common] * len(batch), room) if common is not None
                         else KVCache(config, len(batch), room, device=device, dtype=model.dtype))
                states = _tail_states(model, cache, [p[len(shared):] for p in batch], groups)
                rows_of = [(p, t) for p, g in zip(batch, groups, strict=True) for t in g]  # one per state
                scored = [(r, i) for r, (p, t) in enumerate(rows_of) for i in tails[p][t]]
                conts = [list(requests[i][1]) for _, i in scored]  # a tail's state has a row per token
                starts = [0, *itertools.accumulate(len(x) for x in states)]
                positions = [starts[r] + j for (r, _), c in zip(scored, conts, strict=True) for j in range(len(c))]
                for (_, i), result in zip(scored, _score(model, torch.cat(states), positions,
                                                          [t for c in conts for t in c], list(map(len, conts))),
                                          strict=True):
                    results[i] = result
                bar.update(len(scored))
    return results  # type: ignore[return-value]


def loglikelihood(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                  progress: bool = True, desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """`loglikelihood_tokens` of text (context, continuation) pairs, split as lm-eval splits them."""
    encoded = [encode_pair(tokenizer, ctx, cont) for ctx, cont in requests]
    return loglikelihood_tokens(model, encoded, batch_size, progress, desc)


def generate_until(model, tokenizer, prompts: Sequence[str], until: Sequence[str] = (), max_gen_toks: int = 256,
                   batch_size: int = 16, progress: bool = True, desc: str = "generate", samples: int = 1,
                   temperature: float = 0.8, seed: int = 0) -> list[str]:
    """Greedy continuation of each prompt, cut before the first of `until` (and stopped at EOS).

    As in lm-eval's HF model, the prompt is left-truncated to leave room for `max_gen_toks`.
    `samples > 1` draws that many completions per prompt at `temperature` (prompt-major), for pass@k.
    """
    stops = [s for s in until if s]
    keep = max(1, context_length(model) - max_gen_toks)
    encoded = [encode(tokenizer, p)[-keep:] for p in prompts]
    params = SamplingParams(max_new_tokens=max_gen_toks, temperature=0.0 if samples == 1 else temperature,
                            n=samples, seed=None if samples == 1 else seed, stop=stops or None)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    outputs: list[list[str]] = [[] for _ in encoded]
    with tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False) as bar:
        start = 0
        while start < len(order):
            longest = len(encoded[order[start]])
            # a padded prefill's attention holds rows x heads x T^2 scores: cap rows x T^2 at 2^26
            rows = order[start:start + max(1, min(batch_size, _PREFILL_SCORES // longest ** 2))]
            completions = complete(model, [encoded[i] for i in rows], params, tokenizer)
            for r, i in enumerate(rows):
                for completion in completions[r * samples:(r + 1) * samples]:
                    text = completion.text
                    for stop in stops:
                        text = text.split(stop)[0]
                    outputs[i].append(text)
            bar.update(len(rows))
            start += len(rows)
    return [text for texts in outputs for text in texts]
