"""Perplexity: lm-eval's rolling windows and metrics, checked against lm-eval's own code running
transformers (HFLM) on the same weights, and against llama.cpp on the GGUF file."""

import math

import pytest
import torch
from gguf_helpers import needs_llamacpp, smollm2, smollm2_hf_folder, tiny_model

from llmkit.errors import ConfigError
from llmkit.eval.lm import loglikelihood_tokens
from llmkit.eval.perplexity import loglikelihood_rolling, perplexity, rolling_windows

lm_eval_utils = pytest.importorskip("lm_eval.utils")

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Within fifty "
    "years presses were running in more than two hundred cities across Europe, and the number of books in "
    "circulation grew from thousands to millions. Scholars could compare identical copies of a text, errors "
    "stopped multiplying with every hand copy, and vernacular languages gained a fixed written form. "
    "Pamphlets spread the ideas of the Reformation faster than any authority could answer them; scientific "
    "journals, newspapers and cheap novels followed. Historians still argue about how much of the early "
    "modern world the press made possible and how much it merely accelerated, but few doubt that the "
    "ability to reproduce words exactly, quickly and cheaply changed who could read, what they read and "
    "what they believed. In 2024, roughly 2.2 million new titles were published worldwide — 6,000 a day."
)


@pytest.mark.parametrize("n,max_len,stride", [(1, 8, None), (8, 8, None), (9, 8, None), (37, 8, None),
                                              (37, 8, 3), (37, 8, 1), (64, 16, 8), (5, 16, 4)])
def test_windows_equal_lm_eval(n, max_len, stride):
    tokens = list(range(100, 100 + n))
    context_len = 1 if stride is None else max_len - stride + 1
    expected = [lm_eval_utils.make_disjoint_window(w) for w in
                lm_eval_utils.get_rolling_token_windows(tokens, 7, max_len, context_len)]
    ours = rolling_windows(tokens, 7, max_len, stride)
    assert ours == [(list(c), list(t)) for c, t in expected]
    assert [t for _, cont in ours for t in cont] == tokens  # every token predicted exactly once


def test_bad_stride_is_refused():
    with pytest.raises(ConfigError, match="stride=9 is invalid; expected 1 <= stride <= max_length"):
        rolling_windows([1, 2, 3], 0, 8, 9)


def test_batched_equals_one_at_a_time():
    """Padded batches and the shared-context path (choices of one question, via a KV cache) both
    equal scoring each request alone."""
    model, tok = tiny_model()
    requests = [([1, 5, 9], [12, 30]), ([4], [7, 8, 9, 10, 11]), ([2, 3, 4, 5, 6, 7], [40]),
                ([1, 5, 9], [7]), ([1, 5, 9], [3, 3, 3, 3]), ([2, 3, 4, 5, 6, 7], [41, 42])]
    batched = loglikelihood_tokens(model, requests, batch_size=2, progress=False)
    single = [loglikelihood_tokens(model, [r], batch_size=1, progress=False)[0] for r in requests]
    for (a, ga), (b, gb) in zip(batched, single, strict=True):
        assert a == pytest.approx(b, rel=1e-5) and ga == gb
    with torch.no_grad():  # and by hand: log-softmax of the full forward pass
        ctx, cont = requests[1]
        lp = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]])).double(), -1)[0]
        by_hand = sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert batched[1][0] == pytest.approx(by_hand, rel=1e-5)


def _few_shot_requests(vocab: int):
    """Two 'subjects', each several questions after the same 80-token exemplars, some with one-token
    choices (one row scores them all), some with longer ones, plus a prompt alone."""
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(5, vocab, (n,), generator=g).tolist()

    requests = []
    for exemplars in (tokens(80), tokens(90)):
        for length in (3, 11, 7, 20):
            question = tokens(length)
            requests += [(exemplars + question, [c]) for c in (41, 42, 43, 44)]
            requests += [(exemplars + question, tokens(n)) for n in (2, 5)]
    return requests + [(tokens(30), tokens(4))]


@pytest.mark.parametrize("sliding", [False, True])
def test_shared_exemplars_run_once_and_score_as_alone(sliding):
    """Prompts that start with the same >= 64 tokens run that start once into a cache their batches copy
    (the prompts' own tokens left-padded after it); the scores equal each request run alone, and the
    forwards read fewer tokens than the requests hold. A sliding-window model shares nothing (padding
    between shared and own tokens would move its window) and still scores the same."""
    import dataclasses

    model, _ = tiny_model()
    if sliding:
        config = dataclasses.replace(model.config, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
        state = model.state_dict()
        model = type(model)(config).eval()
        model.load_state_dict(state)
    requests = _few_shot_requests(model.config.vocab_size)
    read = []  # token slots each forward reads, padding included
    original = model.hidden_states

    def counting(input_ids, *args, **kwargs):
        read.append(input_ids.numel())
        return original(input_ids, *args, **kwargs)

    model.hidden_states = counting
    batched = loglikelihood_tokens(model, requests, batch_size=4, progress=False)
    shared_reads = sum(read)
    model.hidden_states = original
    single = [loglikelihood_tokens(model, [r], batch_size=1, progress=False)[0] for r in requests]
    for (a, ga), (b, gb) in zip(batched, single, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and ga == gb
    total = sum(len(c) + len(t) - 1 for c, t in requests)
    assert shared_reads < total / 3 if not sliding else shared_reads < total


def test_stride_gives_more_context_and_lower_perplexity():
    model, tok = tiny_model()
    disjoint = perplexity(model, tok, TEXT, progress=False, max_length=32)
    sliding = perplexity(model, tok, TEXT, stride=8, progress=False, max_length=32)
    assert disjoint["tokens"] == sliding["tokens"] > 64
    assert disjoint["bits_per_byte"] == pytest.approx(-disjoint["loglikelihood"] / disjoint["bytes"] / math.log(2))
    assert sliding["token_perplexity"] != disjoint["token_perplexity"]


@pytest.fixture(scope="module")
def smol_hf_folder():
    return smollm2_hf_folder()


@pytest.mark.slow
@pytest.mark.parametrize("max_length", [64])
def test_smollm2_perplexity_equals_lm_eval_hf(smol_hf_folder, max_length):
    """lm-eval's HFLM (transformers' LlamaForCausalLM from our saved folder) scores the text's rolling
    windows; its per-document log-likelihood and word/byte metrics equal ours to 1e-4 relative."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.models.huggingface import HFLM

    model, tok, _ = smollm2()
    texts = [TEXT, TEXT[:300]]
    hf = HFLM(pretrained=str(smol_hf_folder), max_length=max_length, batch_size=4, dtype="float32", device="cpu")
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    theirs = hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    ours = loglikelihood_rolling(model, tok, texts, batch_size=4, progress=False, max_length=max_length)
    report = perplexity(model, tok, texts, batch_size=4, progress=False, max_length=max_length)
    for (ll, _), ref in zip(ours, theirs, strict=True):
        assert ll == pytest.approx(ref, rel=1e-4)
    assert ours[0][1] > 2 * max_length  # several windows
    words = [(ll, len(t.split())) for ll, t in zip(theirs, texts, strict=True)]
    assert report["word_perplexity"] == pytest.approx(weighted_perplexity(words), rel=1e-4)
    n_bytes = [(ll, len(t.encode())) for ll, t in zip(theirs, texts, strict=True)]
    assert report["byte_perplexity"] == pytest.approx(weighted_perplexity(n_bytes), rel=1e-4)
    assert report["bits_per_byte"] == pytest.approx(bits_per_byte(n_bytes), rel=1e-4)


@pytest.mark.slow
def test_smollm2_sliding_perplexity_equals_transformers(smol_hf_folder):
    """stride < max_length: transformers' LlamaForCausalLM on lm-eval's windows (context_len > 1)."""
    transformers = pytest.importorskip("transformers")
    model, tok, _ = smollm2()
    hf = transformers.LlamaForCausalLM.from_pretrained(smol_hf_folder, dtype=torch.float32).eval()
    text = TEXT[:600]
    ids = tok.encode(text)
    max_len, stride = 64, 24
    total = 0.0
    for ctx, cont in map(lm_eval_utils.make_disjoint_window,
                         lm_eval_utils.get_rolling_token_windows(ids, tok.bos_id, max_len, max_len - stride + 1)):
        inp = (ctx + cont)[-(max_len + 1):][:-1]
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([inp])).logits[0].double(), -1)
        total += sum(lp[len(inp) - len(cont) + i, t].item() for i, t in enumerate(cont))
    report = perplexity(model, tok, text, stride=stride, progress=False, max_length=max_len)
    assert report["loglikelihood"] == pytest.approx(total, rel=1e-4)
    assert report["token_perplexity"] == pytest.approx(math.exp(-total / len(ids)), rel=1e-4)


@pytest.mark.slow
@needs_llamacpp
def test_smollm2_perplexity_within_one_percent_of_llamacpp():
    """llama.cpp computes with the quantized weights (Q4_1 matmuls on int8 activations), ours with the
    dequantized fp32 weights: on ~1,500 tokens of KJV prose in 512-token rolling windows, token
    perplexity (and so word perplexity and bits per byte, the same sum over other counts) within 1 %."""
    from llmkit.data.corpora import documents
    from llmkit.formats.llamacpp import LlamaCpp, log_softmax

    text = ""
    for doc in documents("kjv"):
        text += doc.text + "\n\n"
        if len(text) > 6000:
            break
    model, tok, path = smollm2()
    ref = LlamaCpp(path, n_ctx=512, n_threads=1)
    ids = tok.encode(text)
    assert ref.tokenize(text) == ids
    total = 0.0
    windows = rolling_windows(ids, tok.bos_id, 512)
    for ctx, cont in windows:
        inp = (ctx + cont)[:-1]
        lp = log_softmax(ref.logits(inp))
        total += sum(lp[len(inp) - len(cont) + i, t] for i, t in enumerate(cont))
    ref.close()
    ours = perplexity(model, tok, text, progress=False, max_length=512)
    theirs = math.exp(-total / len(ids))
    print(f"perplexity of {len(ids)} KJV tokens in {len(windows)} windows: llmkit {ours['token_perplexity']:.4f}, "
          f"llama.cpp {theirs:.4f}")
    assert len(windows) >= 3
    assert ours["token_perplexity"] == pytest.approx(theirs, rel=0.01)
    assert ours["bits_per_byte"] == pytest.approx(-total / len(text.encode()) / math.log(2), rel=0.01)
