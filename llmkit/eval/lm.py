"""The two requests every evaluation reduces to, computed the way lm-evaluation-harness does.

- `loglikelihood_tokens`: for (context ids, continuation ids) pairs, the summed log-probability of
  the continuation and whether greedy decoding would have produced it. Batched (right-padded, so
  causal attention never sees the padding), longest first, under a tqdm bar.
- `generate_until`: greedy continuations of text prompts, cut at the first stop string.

`encode_pair` and `prefix_token_id` copy lm-eval's rules (`TemplateLM._encode_pair`, HFLM's
`prefix_token_id`), so a task scored here and through `lm_eval --model hf` sees the same tokens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from llmkit.data.collate import pad_tokens
from llmkit.errors import ConfigError
from llmkit.generate.engine import complete
from llmkit.generate.sampling import SamplingParams
from llmkit.model import KVCache

_LOGIT_ROWS = 512  # positions per LM-head chunk: keeps (rows, vocab) float32 logits small
_PREFILL_SCORES = 1 << 26  # rows x prompt length^2 of one generation batch (bounds the attention memory)


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


def _score(model, hidden: torch.Tensor, targets: list[int], lengths: list[int]) -> list[tuple[float, bool]]:
    """(summed log-prob, all greedy) of consecutive runs of `lengths` targets, from their hidden states."""
    target = torch.tensor(targets, device=hidden.device)
    logprob, greedy = [], []
    for s in range(0, len(target), _LOGIT_ROWS):
        lp = torch.log_softmax(model.logits(hidden[s:s + _LOGIT_ROWS]).float(), dim=-1)
        t = target[s:s + _LOGIT_ROWS]
        logprob.append(lp.gather(-1, t[:, None])[:, 0])
        greedy.append(lp.argmax(-1) == t)
    logprob_all, greedy_all = torch.cat(logprob).double(), torch.cat(greedy)
    out, offset = [], 0
    for n in lengths:
        out.append((float(logprob_all[offset:offset + n].sum()), bool(greedy_all[offset:offset + n].all())))
        offset += n
    return out


@torch.inference_mode()
def loglikelihood_tokens(model, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                         progress: bool = True, desc: str = "loglikelihood",
                         max_length: int | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), is greedy) per request, in the order given.

    Like lm-eval, the model reads the last `max_length + 1` tokens of context + continuation minus the
    final one, so a context longer than the window is left-truncated. Requests that share everything
    but their continuation (the choices of one question) run the shared tokens once into a KV cache
    and only their continuations as a batch; the rest run in right-padded batches, longest first.
    """
    limit = context_length(model, max_length)
    inputs = [(list(ctx) + list(cont))[-(limit + 1):][:-1] for ctx, cont in requests]
    split = [len(inputs[i]) - len(requests[i][1]) for i in range(len(requests))]  # where scored positions start
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i in range(len(requests)):
        groups[tuple(inputs[i][:split[i]])].append(i)
    shared = [g for key, g in groups.items() if len(g) > 1 and key]
    alone = sorted((i for key, g in groups.items() if not (len(g) > 1 and key) for i in g),
                   key=lambda i: -len(inputs[i]))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    device = model.device
    with tqdm(total=len(requests), desc=desc, disable=not progress, leave=False) as bar:
        for group in shared:
            prefix = inputs[group[0]][:split[group[0]]]
            tails = [inputs[i][split[i]:] for i in group]
            cache = KVCache(model.config, 1, len(prefix) + max(map(len, tails)), device=device, dtype=model.dtype)
            model.hidden_states(torch.tensor([prefix], device=device), kv_cache=cache)
            cache.reorder(torch.zeros(len(group), dtype=torch.long, device=device))
            hidden = model.hidden_states(pad_tokens(tails, 0).to(device), kv_cache=cache)
            rows = torch.cat([hidden[r, :len(t)] for r, t in enumerate(tails)])
            conts = [list(requests[i][1]) for i in group]
            for i, result in zip(group, _score(model, rows, [t for c in conts for t in c], list(map(len, conts))),
                                 strict=True):
                results[i] = result
            bar.update(len(group))
        for start in range(0, len(alone), batch_size):
            batch = alone[start:start + batch_size]
            hidden = model.hidden_states(pad_tokens([inputs[i] for i in batch], 0).to(device))
            conts = [list(requests[i][1]) for i in batch]
            rows = torch.cat([hidden[r, split[i]:len(inputs[i])] for r, i in enumerate(batch)])
            for i, result in zip(batch, _score(model, rows, [t for c in conts for t in c], list(map(len, conts))),
                                 strict=True):
                results[i] = result
            bar.update(len(batch))
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
