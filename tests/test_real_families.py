"""The real Qwen2.5-Coder-0.5B-Instruct and Gemma-3-270M GGUFs in llmkit against llama.cpp
(llama-cpp-python) on the same files: logits on 2,000 tokens of packaged text, perplexity, and
greedy chat continuations.

llama.cpp quantizes activations to 8 bits inside its quantized matmuls (Q4_K/Q5_0/Q6_K/Q8_0 here)
while llmkit dequantizes the weights to fp32 and computes in fp32, so logits are compared by
agreement (top-1, KL, perplexity), as for SmolLM2 in test_gguf_llamacpp.py.
"""

import functools

import numpy as np
import pytest
import torch
from gguf_helpers import needs_llamacpp

import llmkit
from llmkit.config import ModelConfig
from llmkit.formats.gguf import config_from_metadata, read_metadata
from llmkit.formats.llamacpp import LlamaCpp, agreement, margin, perplexity
from llmkit.formats.named import resolve

pytestmark = [needs_llamacpp, pytest.mark.slow]

MODELS = ["qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]
N_TOKENS = 2000


PRESETS = {"qwen2.5-coder-0.5b-instruct": "qwen2.5-0.5b", "gemma-3-270m": "gemma-3-270m"}


@pytest.mark.parametrize("name", MODELS)
def test_the_family_preset_is_the_real_checkpoints_config(name):
    path = resolve(name)
    real = config_from_metadata(read_metadata(path), {"token_embd.weight"}, str(path)).to_dict()
    preset = ModelConfig.from_preset(PRESETS[name]).to_dict()
    assert {**real, "name": None} == {**preset, "name": None}


@functools.cache
def loaded(name):
    return llmkit.load(name)


@functools.cache
def reference(name):
    return LlamaCpp(resolve(name), n_ctx=N_TOKENS + 64)


@functools.cache
def wikipedia_ids(name, n=N_TOKENS):
    """The first `n` tokens of the packaged Wikipedia leads, joined by blank lines, BOS first where the
    model adds one."""
    from llmkit.data.corpora import documents

    _, tok = loaded(name)
    text = ""
    for doc in documents("wikipedia"):
        text += doc.text + "\n\n"
        if len(text) > 8 * n:
            break
    ids = tok.encode(text, add_special_tokens=True)
    assert len(ids) >= n
    return ids[:n]


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_perplexity_agree_with_llama_cpp(name):
    model, _ = loaded(name)
    ids = wikipedia_ids(name)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    theirs = reference(name).logits(ids)
    stats = agreement(ours, theirs)
    ppl_ours, ppl_theirs = perplexity(ours, ids), perplexity(theirs, ids)
    print(f"\n{name} vs llama.cpp on {len(ids)} Wikipedia tokens: {stats}; "
          f"perplexity llmkit {ppl_ours:.4f}, llama.cpp {ppl_theirs:.4f}")
    assert stats["top1"] >= 0.93, stats
    assert stats["mean_kl"] <= 0.01, stats
    assert abs(ppl_ours / ppl_theirs - 1) < 0.01, (ppl_ours, ppl_theirs)
    assert 1.5 < ppl_theirs < 100  # a working model on English prose, not noise


CHATS = ["What is the capital of France?", "Write a Python function that reverses a string."]


@pytest.mark.parametrize("prompt", CHATS)
@pytest.mark.parametrize("name", MODELS)
def test_greedy_chat_continuation_equals_llama_cpp_until_a_near_tie(name, prompt):
    """64 greedy tokens after the model's own chat template; a difference is accepted only where both
    models' top two logits are within 0.5 of each other (a near-tie that 8-bit activations can flip)."""
    model, tok = loaded(name)
    ref = reference(name)
    if tok.chat_template is None:  # the base Gemma-3 GGUF ships none: google/gemma-3-*-it's template
        tok.chat_template = "gemma"
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
    theirs = ref.greedy(list(ids), 64, stop_ids=(tok.eos_id,))
    ours = llmkit.generate(model, tok, list(ids), max_new_tokens=64, temperature=0.0).token_ids
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    print(f"\n{name} {prompt!r}: ours {tok.decode(ours)!r}\n  llama.cpp {tok.decode(theirs)!r}")
    if k is None:
        assert ours == theirs
        return
    prefix = list(ids) + ours[:k]
    with torch.no_grad():
        our_margin = margin(model(torch.tensor([prefix]))[0, -1].numpy())
    their_margin = margin(np.asarray(ref.logits(prefix)[-1]))
    print(f"  first difference at token {k}: margins llmkit {our_margin:.3f}, llama.cpp {their_margin:.3f}")
    assert k >= 1 and our_margin < 0.5 and their_margin < 0.5, (k, our_margin, their_margin)


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_transformers_own_gguf_loader(name):
    """transformers reads the same GGUF (`gguf_file=`, the gguf package's dequantizers as ours) into
    its own Qwen2/Gemma3 classes: fp32 logits agree to 1e-5 (the same math up to matmul blocking;
    measured 0.0 on this machine)."""
    import transformers

    path = resolve(name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    model, _ = loaded(name)
    ids = torch.tensor([wikipedia_ids(name)[:256]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), theirs(ids).logits, atol=1e-5, rtol=0)
