"""`llmkit memory`: the seeds' 7B check, and the LoRA / QLoRA counts equal those of the real modules."""

import pytest

from llmkit.analysis.accounting import training_memory
from llmkit.cli import main
from llmkit.config import ModelConfig
from llmkit.errors import ConfigError
from llmkit.model import Transformer
from llmkit.peft.lora import LoraConfig, apply_lora, trainable_parameters
from llmkit.peft.qlora import QuantizedLinear

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
