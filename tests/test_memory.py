"""`llmkit memory`: the seeds' 7B check, the LoRA / QLoRA counts equal those of the real modules, the
activation count equals the tensors autograd keeps, and the peak estimate is the measured peak RSS."""

import importlib.util
from pathlib import Path

import pytest
import torch

from llmkit.analysis.accounting import activation_elements_per_token, training_memory
from llmkit.cli import main
from llmkit.config import ModelConfig
from llmkit.errors import ConfigError
from llmkit.model import Transformer
from llmkit.peft.lora import TARGETS, LoraConfig, apply_lora, trainable_parameters
from llmkit.peft.qlora import QuantizedLinear
from llmkit.train.objectives import causal_lm_loss

ROOT = Path(__file__).resolve().parent.parent

LLAMA2_7B = ModelConfig.from_preset("llama-tiny", vocab_size=32000, n_layer=32, n_head=32, n_kv_head=32,
                                    d_model=4096, d_ff=11008, max_seq_len=4096)


def test_7b_full_fine_tune_is_about_84_gb():
    m = training_memory(LLAMA2_7B, "full", precision="bf16")
    assert m["parameters"] == 6_738_415_616  # Llama-2-7B, as transformers counts it
    static = m["bytes"]["weights"] + m["bytes"]["gradients"] + m["bytes"]["optimizer"]
    assert static == 12 * m["parameters"]  # 2 + 2 + 8 bytes per parameter
    assert abs(static / 84e9 - 1) < 0.05  # 80.9 GB: the seeds' "7B x 12 bytes = 84 GB"
    lora = training_memory(LLAMA2_7B, "lora", precision="bf16", lora_r=8)
    qlora = training_memory(LLAMA2_7B, "qlora", precision="bf16", lora_r=8)
    assert lora["bytes"]["weights"] < static / 5 and lora["bytes"]["optimizer"] < 1e9
    assert qlora["bytes"]["weights"] < lora["bytes"]["weights"] / 3  # 4-bit blocks vs 16-bit


@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v", "o", "gate", "up", "down")])
def test_lora_and_qlora_counts_match_the_modules(targets):
    config = ModelConfig.from_preset("llama-tiny")
    model = Transformer(config)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    lora = apply_lora(model, LoraConfig(r=4, targets=targets, base_bits=4))
    m = training_memory(config, "qlora", precision="fp32", lora_r=4, lora_targets=targets, base_bits=4)
    assert m["trainable_parameters"] == trainable_parameters(lora)
    quantized = [q for q in model.modules() if isinstance(q, QuantizedLinear)]
    stored = sum(q.storage_bytes() for q in quantized)
    float_linear = sum(q.in_features * q.out_features * 4 for q in quantized)
    adapters = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert m["bytes"]["weights"] == total - float_linear + stored + adapters
    assert m["bytes"]["optimizer"] == 8 * trainable_parameters(lora)


def test_cli_and_errors(capsys):
    assert main(["memory", "smollm2-135m", "--method", "lora", "--batch-size", "8", "--seq-len", "64"]) == 0
    assert "lora fine-tuning (bf16, batch 8 x 64 tokens)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="LoRA target"):
        training_memory(ModelConfig.from_preset("gpt2"), "lora", lora_targets=("gate",))


# ---- the estimate against the tensors autograd keeps and against a measured peak ---------------

FAMILIES = {  # small shapes of each block layout: llama (SmolLM2), qwen2 (q/k/v biases), GPT-2 (LayerNorm, plain MLP)
    "llama": ModelConfig.from_preset("llama-8m", n_layer=2, vocab_size=512),
    "qwen2": ModelConfig.from_preset("qwen2.5-0.5b", n_layer=2, vocab_size=512, d_model=64, n_head=4, n_kv_head=2,
                                     d_ff=128),
    "gpt2": ModelConfig.from_preset("gpt2", n_layer=2, d_model=64, n_head=2, vocab_size=400),
}


def saved_elements(model, batch: int, seq: int = 16) -> int:
    """Elements of the tensors autograd keeps for backward of one loss (weights and the LM head's
    gradient, which the fused loss makes in forward, left out)."""
    kept, frozen = {}, {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t
        return t

    x = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, (x[:, :-1], x[:, 1:]))
    head = (model.config.vocab_size, model.config.d_model)
    return sum(t.untyped_storage().nbytes() // t.element_size() for p, t in kept.items()
               if p not in frozen and t.is_floating_point() and tuple(t.shape) != head)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method,targets,bits", [("full", (), 0), ("lora", TARGETS, 0), ("lora", ("q", "v"), 0),
                                                 ("lora", ("o", "down"), 0), ("qlora", TARGETS, 4)])
def test_activation_count_equals_the_saved_tensors(family, method, targets, bits):
    config = FAMILIES[family]
    torch.manual_seed(0)
    model = Transformer(config)
    targets = tuple(t for t in targets if t != "gate" or config.gated_mlp)
    if method != "full":
        apply_lora(model, LoraConfig(r=8, targets=targets, base_bits=bits))
    per_token = (saved_elements(model.train(), 2) - saved_elements(model, 1)) / 16  # what grows with the batch
    assert per_token == activation_elements_per_token(config, method, targets, 8)


def _benchmark():
    spec = importlib.util.spec_from_file_location("finetune_memory", ROOT / "benchmarks" / "finetune_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["full", "lora", "qlora-int4"])
def test_estimate_is_within_15_percent_of_the_measured_peak(method):
    """The loop's own step (fused AdamW, fused loss) on llama-8m, 2 steps of 8 x 256 tokens, in a fresh
    process that returns freed memory (what the estimate counts): the peak RSS above the runtime's
    and in all. Measured 0-4 % above the estimate; the estimate before this check counted logits the
    fused loss never holds and no transient buffers, and was 13-18 % high here."""
    r = _benchmark().run(method, "llama-8m", batch=8, seq=256, steps=2)
    runtime = r["runtime_rss_mb"]
    print(f"\n{method}: peak RSS {r['measured_peak_rss_mb']} MiB, estimate {r['estimated_peak_rss_mb']} MiB "
          f"(runtime {runtime} MiB; parts {r['estimated_parts_mb']})")
    assert r["allocator"] == "returning"
    above = (r["measured_peak_rss_mb"] - runtime) / (r["estimated_peak_rss_mb"] - runtime)
    assert abs(above - 1) < 0.15, above
    assert abs(r["measured_over_estimate"] - 1) < 0.15
