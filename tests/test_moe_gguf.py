"""Tiny Mixtral and Qwen2-MoE models exported to GGUF run in llama.cpp (llama-cpp-python) as in llmkit:
F32 logits to float rounding, the files read back into the same tensors, and (Mixtral) F32 and Q8_0
greedy tokens equal.

llama.cpp computes Mixtral as its `llama` architecture with `llama.expert_count` experts: the router
`ffn_gate_inp` (kept F32, as llama.cpp never quantizes it) and the experts as stacked 3-D tensors
`ffn_{gate,up,down}_exps`; Qwen2-MoE as `qwen2moe`, with the shared expert `ffn_*_shexp` and its gate
`ffn_gate_inp_shexp`. The softmax, top-k and (Mixtral's) renormalisation are llama.cpp's own code.
"""

from __future__ import annotations

import pytest
import torch
from gguf_helpers import needs_llamacpp, tiny_tokenizer

from llmkit import ConfigError, ModelConfig
from llmkit.formats.gguf import read_gguf, write_gguf
from llmkit.formats.llamacpp import LlamaCpp, agreement
from llmkit.model import Transformer

pytestmark = needs_llamacpp


def _mixtral(std: float, seed: int = 1, **changes) -> tuple[Transformer, object]:
    tok = tiny_tokenizer()
    config = ModelConfig(**{**dict(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                                   max_seq_len=256, n_experts=4, experts_per_token=2, bos_token_id=tok.bos_id,
                                   eos_token_id=tok.eos_id, name="tiny-mixtral"), **changes})
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, std)
    return model, tok


PROMPT = "The quick brown fox jumps over the lazy dog. To be, or not to be"


QWEN2_MOE = dict(shared_expert_d_ff=64, qkv_bias=True, moe_renormalize=False, name="tiny-qwen2-moe")
MOE_TENSORS = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
SHARED_TENSORS = ("ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")


@pytest.mark.parametrize("arch, changes, tensors", [("llama", {}, MOE_TENSORS),
                                                    ("qwen2moe", QWEN2_MOE, MOE_TENSORS + SHARED_TENSORS)])
def test_f32_export_reads_back_exactly_and_logits_match_llama_cpp(tmp_path, arch, changes, tensors):
    """F32: the same weights, so the logits differ only by float rounding and llama.cpp's f16 KV cache:
    measured 0.0018 (Mixtral) and 0.0014 (Qwen2-MoE); the bound is test_gguf_llamacpp's 0.02. Gate and
    up swapped in one Mixtral layer give 1.8, its top-2 weights left unrenormalised 1.1, the Qwen2-MoE
    ones renormalised 0.97."""
    model, tok = _mixtral(std=0.1, **changes)
    path = tmp_path / f"{arch}-F32.gguf"
    types = write_gguf(path, model.config, model.state_dict(), tok, quant="F32")
    assert {g for g in types if "exp" in g or "gate_inp" in g} == {
        f"blk.{i}.{n}.weight" for i in range(2) for n in tensors}
    back = read_gguf(path)
    assert back.config == model.config and back.metadata[f"{arch}.expert_count"] == 4
    for name, t in model.state_dict().items():
        assert torch.equal(back.tensors[name], t), name
    ids = tok.encode(PROMPT)
    r = LlamaCpp(path, n_ctx=256)
    try:
        with torch.no_grad():
            stats = agreement(model(torch.tensor([ids]))[0].numpy(), r.logits(ids))
    finally:
        r.close()
    assert stats["max_abs_diff"] < 0.02 and stats["mean_kl"] < 1e-4, stats


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_greedy_tokens_equal_llama_cpp(tmp_path, quant):
    """Embeddings 20x larger and the head a permutation of them make each argmax decisive, so
    llama.cpp's 8-bit activations (Q8_0) cannot flip it; the experts still move every logit."""
    model, tok = _mixtral(std=0.05)
    perm = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.embed.weight.mul_(20)
        model.lm_head.weight.copy_(model.embed.weight[perm])
    path = tmp_path / f"mixtral-{quant}.gguf"
    types = write_gguf(path, model.config, model.state_dict(), tok, quant=quant)
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.ffn_down_exps.weight"] == quant
    ours = Transformer.from_pretrained(path)
    ids = tok.encode("The quick brown fox")
    r = LlamaCpp(path, n_ctx=256)
    try:
        assert r.tokenize("The quick brown fox") == ids
        theirs = r.greedy(ids, 32)
    finally:
        r.close()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(32):
            seq.append(int(ours(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[len(ids):] == theirs
    assert len(set(theirs)) > 16  # a real sequence, not one token repeated


def test_moe_exports_llama_cpp_would_compute_differently_are_refused(tmp_path):
    model, tok = _mixtral(std=0.1)
    qwen = model.config.replace(shared_expert_d_ff=32, qkv_bias=True, moe_renormalize=True)
    with pytest.raises(ConfigError, match="qwen2_moe model with moe_renormalize=True"):
        write_gguf(tmp_path / "q.gguf", qwen, Transformer(qwen).state_dict(), tok, quant="F32")
    windowed = model.config.replace(sliding_window=8)
    with pytest.raises(ConfigError, match="sliding_window=8 is not supported"):
        write_gguf(tmp_path / "w.gguf", windowed, model.state_dict(), tok, quant="F32")
