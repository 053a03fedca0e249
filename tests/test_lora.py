"""LoRA: fresh == base, merged == unmerged, only adapters train, peft loads our adapters with our logits,
QLoRA's quantized base passes gradients to its input; bad configurations give one clear error."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, FormatError
from llmkit.model import Transformer
from llmkit.peft.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from llmkit.peft.qlora import QuantizedLinear
from llmkit.train.loop import LoopConfig, train
from llmkit.train.objectives import causal_lm_loss, classification_loss

ATOL = 1e-5
IDS = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(1))


def tiny(kind="llama", num_labels=0, seed=0):
    torch.manual_seed(seed)
    overrides = dict(vocab_size=512, n_layer=2, n_head=4, d_model=64, max_seq_len=128)
    if kind == "gpt2":
        config = ModelConfig.from_preset("gpt2", **overrides, num_labels=num_labels, bos_token_id=0, eos_token_id=0)
    else:
        config = ModelConfig.from_preset("llama-tiny", num_labels=num_labels)
    return Transformer(config).eval()


def randomize_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def outputs(model, ids=IDS):
    with torch.no_grad():
        return model.classify(ids) if model.config.num_labels else model(ids)


def test_fresh_lora_equals_base_and_merged_equals_unmerged():
    model = tiny()
    base = outputs(model)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets="all"))
    assert len(lora_layers(model)) == 2 * 7
    assert torch.equal(outputs(model), base)  # B = 0: exactly the base model
    randomize_adapters(model)
    unmerged = outputs(model)
    assert (unmerged - base).abs().max() > 1e-2  # the adapters do something
    for layer in lora_layers(model).values():
        layer.merge()
    torch.testing.assert_close(outputs(model), unmerged, rtol=0, atol=ATOL)
    for layer in lora_layers(model).values():
        layer.unmerge()
    torch.testing.assert_close(outputs(model), unmerged, rtol=0, atol=ATOL)
    merge_lora(model)
    assert not lora_layers(model) and set(model.state_dict()) == set(tiny().state_dict())
    torch.testing.assert_close(outputs(model), unmerged, rtol=0, atol=ATOL)


@pytest.mark.parametrize("num_labels", [0, 2], ids=["lm", "classifier"])
def test_training_changes_only_adapters_and_head(tmp_path, num_labels):
    model = tiny(num_labels=num_labels)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=("q", "v", "down")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected_trainable = 2 * (4 * (64 + 64) + 4 * (64 + 32) + 4 * (192 + 64)) + 2 * 64 * (num_labels > 0)
    assert trainable_parameters(model) == expected_trainable

    class Data:
        def next_batch(self):
            if num_labels:
                return {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": torch.tensor([0, 1])}
            return IDS[:, :-1], IDS[:, 1:]

        def state_dict(self):
            return {}

    objective = classification_loss if num_labels else causal_lm_loss
    config = LoopConfig(max_steps=3, lr=1e-2, warmup_steps=0, progress=False, device="cpu")
    result = train(model, objective, Data(), config, tmp_path,
                   save_weights=lambda folder, state: save_adapter(model, folder))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    trained = {k for k, v in before.items() if k.endswith(("lora_A", "lora_B")) or k == "score.weight"}
    assert changed == trained
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    saved = result.last_checkpoint
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "trainer_state"]


def _peft_logits(folder, adapter, ids, classifier):
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    hf = auto.from_pretrained(folder, dtype=torch.float32).eval()
    hf.config.pad_token_id = 0  # transformers' classifier pools by the pad id (IDS never contain it)
    peft_model = PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        return peft_model(input_ids=ids).logits


@pytest.mark.parametrize("kind,num_labels,targets", [
    ("llama", 0, "all"), ("llama", 3, ("q", "k", "o", "up")), ("gpt2", 0, "all"), ("gpt2", 2, ("q", "k", "v", "o"))],
    ids=["llama-lm", "llama-classifier", "gpt2-lm", "gpt2-classifier"])
def test_peft_loads_our_adapter_with_our_logits(tmp_path, kind, num_labels, targets):
    model = tiny(kind, num_labels)
    if num_labels:
        with torch.no_grad():
            model.score.weight.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "base")
    apply_lora(model, LoraConfig(r=4, alpha=12, targets=targets))
    randomize_adapters(model)
    if num_labels:
        with torch.no_grad():
            model.score.weight.add_(0.3)  # a trained head differs from the saved base's
    ours = outputs(model)
    save_adapter(model, tmp_path / "adapter")
    theirs = _peft_logits(tmp_path / "base", tmp_path / "adapter", IDS, num_labels > 0)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)
    # and back: our loader on a fresh base gives the same outputs
    again = load_adapter(Transformer.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(outputs(again), ours, rtol=0, atol=ATOL)


def test_adapter_files_use_peft_names(tmp_path):
    model = apply_lora(tiny(), LoraConfig(r=2, alpha=4, targets=("q", "down")))
    save_adapter(model, tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] == (2, 64)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"] == (64, 2)
    assert len(shapes) == 2 * 2 * 2
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]) == \
        ("LORA", 2, 4, ["down_proj", "q_proj"])


def test_gpt2_adapter_names_its_fused_and_split_modules(tmp_path):
    model = apply_lora(tiny("gpt2"), LoraConfig(r=2, targets="all"))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"]
    assert config["rank_pattern"] == {"c_attn": 6}


@pytest.mark.parametrize("bits,tol", [(8, 0.05), (4, 0.5)])
def test_qlora_quantized_base_trains_adapters(bits, tol):
    model = tiny()
    base = outputs(model)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets="all", base_bits=bits))
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 2 * 7 and all(not any(p.requires_grad for p in m.parameters()) for m in linears)
    quantized = outputs(model)
    assert 0 < (quantized - base).abs().max() < tol  # close to, not equal to, the float base
    loss, _ = causal_lm_loss(model.train(), (IDS[:, :-1], IDS[:, 1:]))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith(("lora_A", "lora_B")) for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lora_B"))
    # the input gradient through the dequantized matmul equals that of the dequantized float layer
    q = linears[0]
    x = torch.randn(3, q.in_features, requires_grad=True)
    q(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    q.dequantized()(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    randomize_adapters(model)
    model.eval()
    before = outputs(model)
    merge_lora(model)
    torch.testing.assert_close(outputs(model), before, rtol=0, atol=ATOL)


def test_bad_configurations_are_named():
    with pytest.raises(ConfigError, match="rank r must be a positive integer, got 0"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match=r"unknown \['qq'\]"):
        LoraConfig(targets=("qq",))
    with pytest.raises(ConfigError, match=r"target\(s\) \['gate'\] match no module of this model"):
        apply_lora(tiny("gpt2"), LoraConfig(targets=("q", "gate")))
    model = apply_lora(tiny("gpt2"), LoraConfig(targets=("q", "v")))
    with pytest.raises(ConfigError, match="GPT-2 adapters must target all three"):
        save_adapter(model, "/nonexistent-never-written")
    assert isinstance(model.blocks[0].attn.q_proj, LoraLinear)


def _peft_adapter(tmp_path, **lora_fields):
    """An adapter made by peft itself on our saved tiny Llama, its B weights random (a trained adapter)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    tiny().save_pretrained(tmp_path / "base")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    peft_model = get_peft_model(hf, PeftLoraConfig(**{"r": 4, "lora_alpha": 8, **lora_fields}))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        return peft_model.eval()(input_ids=IDS).logits


def test_peft_rank_and_alpha_patterns_load_with_peft_logits(tmp_path):
    """Per-module r and alpha (peft's rank_pattern / alpha_pattern) change the scaling of those modules
    only; loaded with one r and alpha they would be off, so the logits would differ."""
    theirs = _peft_adapter(tmp_path, target_modules=["q_proj", "v_proj", "down_proj"],
                           rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                           alpha_pattern={"down_proj": 32, "q_proj": 3})
    ours = load_adapter(Transformer.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(outputs(ours), theirs, rtol=0, atol=ATOL)
    merged = outputs(merge_lora(ours))
    torch.testing.assert_close(merged, theirs, rtol=0, atol=ATOL)


@pytest.mark.parametrize("field, value, message", [
    ("lora_bias", True, "sets lora_bias=True; llmkit loads plain LoRA only"),
    ("layer_replication", [[0, 2], [1, 2]], "sets layer_replication="),
    ("bias", "all", "bias='all': the adapter trains biases"),
    ("some_future_field", 1, r"field\(s\) \['some_future_field'\] that llmkit does not know"),
])
def test_peft_fields_llmkit_does_not_compute_are_refused_by_name(tmp_path, field, value, message):
    _peft_adapter(tmp_path, target_modules=["q_proj"])
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(FormatError, match=message):
        load_adapter(Transformer.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
