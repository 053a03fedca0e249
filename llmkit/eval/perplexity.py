"""Perplexity of a text or corpus: per token, per word and per byte (bits per byte).

Texts longer than the context are scored in windows exactly as lm-eval's `loglikelihood_rolling`
does (`get_rolling_token_windows` + `make_disjoint_window`): the first window predicts every token
from a prefix token (BOS, else EOS); each later window predicts the next `stride` tokens, reading
up to `max_length - stride` earlier tokens as context. `stride = max_length` (the default, and
lm-eval's only setting) gives disjoint windows; a smaller stride gives every prediction more
context (the "sliding window" of HF's perplexity guide) at more compute.

Token perplexity only compares models that share a tokenizer (a coarser tokenizer predicts fewer,
harder tokens); word perplexity and bits per byte divide the same total log-likelihood by a count
that does not depend on the tokenizer, so they compare any two models. Words are counted as lm-eval
counts them (`len(re.split(r"\\s+", text))`), bytes as UTF-8 bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from llmkit.errors import ConfigError
from llmkit.eval.lm import context_length, encode, loglikelihood_tokens, prefix_token_id


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int,
                    stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows covering `tokens` once; lm-eval's windows with context_len =
    max_len - stride + 1, made disjoint (the context holds no token the continuation predicts)."""
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ConfigError(f"stride={stride} is invalid; expected 1 <= stride <= max_length ({max_len})")
    tokens = list(tokens)
    windows: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return windows
    first = min(max_len, len(tokens))
    windows.append(([prefix_token] + tokens[:first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, stride)
        end = predicted + n
        windows.append((tokens[max(0, end - max_len - 1):end - 1], tokens[end - n:end]))
        predicted = end
    # make_disjoint_window: drop from the context the tokens the continuation re-predicts
    return [(ctx[:len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


def loglikelihood_rolling(model, tokenizer, texts: Sequence[str], stride: int | None = None,
                          batch_size: int = 8, progress: bool = True,
                          max_length: int | None = None) -> list[tuple[float, int]]:
    """(total log-likelihood in nats, number of tokens) of each text, every token predicted once;
    windows of `max_length` tokens (default: the model's context)."""
    prefix, limit = prefix_token_id(tokenizer), context_length(model, max_length)
    owners, windows = [], []
    counts = []
    for i, text in enumerate(texts):
        ids = encode(tokenizer, text)
        counts.append(len(ids))
        for window in rolling_windows(ids, prefix, limit, stride):
            owners.append(i)
            windows.append(window)
    totals = [0.0] * len(texts)
    scored = loglikelihood_tokens(model, windows, batch_size, progress, "perplexity windows", limit)
    for owner, (logprob, _) in zip(owners, scored, strict=True):
        totals[owner] += logprob
    return list(zip(totals, counts, strict=True))


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def perplexity(model, tokenizer, texts: str | Sequence[str], stride: int | None = None, batch_size: int = 8,
               progress: bool = True, max_length: int | None = None) -> dict:
    """Token, word and byte perplexity and bits per byte of `texts` (one string or a corpus).

    A corpus is aggregated as lm-eval aggregates documents: the summed log-likelihood over the summed
    count (tokens, words or bytes), not a mean of per-document perplexities.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not any(texts):
        raise ConfigError("perplexity needs at least one non-empty text; got none")
    limit = context_length(model, max_length)
    scored = loglikelihood_rolling(model, tokenizer, texts, stride, batch_size, progress, limit)
    nll = -sum(ll for ll, _ in scored)
    tokens = sum(n for _, n in scored)
    words = sum(count_words(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "documents": len(texts), "tokens": tokens, "words": words, "bytes": n_bytes,
        "loglikelihood": -nll,
        "token_perplexity": math.exp(nll / tokens),
        "word_perplexity": math.exp(nll / words),
        "byte_perplexity": math.exp(nll / n_bytes),
        "bits_per_byte": nll / n_bytes / math.log(2),
        "max_length": limit, "stride": stride or limit,
    }
