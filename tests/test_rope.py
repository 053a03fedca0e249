"""Long-context RoPE scaling: each type's frequencies and attention factor equal transformers'
`ROPE_INIT_FUNCTIONS`, config.json and GGUF carry them, bad dicts are refused by name, and a tiny
Llama with each type gives transformers' logits past its trained context, in both directions."""

import json

import pytest
import torch
from gguf_helpers import CORPUS, needs_llamacpp, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llmkit import ModelConfig, Transformer, rope
from llmkit.cli import main
from llmkit.errors import ConfigError, FormatError
from llmkit.formats.gguf import config_from_metadata, read_gguf, write_gguf
from llmkit.formats.llamacpp import LlamaCpp, agreement

ATOL = 1e-5  # fp32 logits, as tests/test_model.py
LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
# Several factors per type, transformers' optional keys included.
CASES = [
    ("linear", {"factor": 2.0}), ("linear", {"factor": 8.0}), ("linear", {"factor": 0.5}),
    ("dynamic", {"factor": 2.0}), ("dynamic", {"factor": 3.7}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 512}),
    ("yarn", {"factor": 2.5, "original_max_position_embeddings": 256, "beta_fast": 16, "beta_slow": 2,
              "truncate": False}),
    ("yarn", {"factor": 8.0, "original_max_position_embeddings": 128, "mscale": 1.0, "mscale_all_dim": 0.707}),
    ("yarn", {"factor": 16.0, "original_max_position_embeddings": 1024, "attention_factor": 1.25}),
    ("llama3", {"factor": 8.0, "original_max_position_embeddings": 512, **LLAMA3}),
    ("llama3", {"factor": 4.0, "original_max_position_embeddings": 256, "low_freq_factor": 2.0,
                "high_freq_factor": 8.0}),
]


def hf_config(head_dim, theta, scaling, max_pos=2048):
    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters={**scaling, "rope_theta": theta})


@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (64, 100000.0), (128, 500000.0)])
@pytest.mark.parametrize("kind,keys", CASES, ids=[f"{k}-{v['factor']:g}" for k, v in CASES])
def test_inv_freq_and_attention_factor_equal_transformers(kind, keys, head_dim, theta):
    scaling = {"rope_type": kind, **keys}
    rope.check_rope_scaling(scaling)
    config = hf_config(head_dim, theta, scaling)
    # dynamic: below, at and above the trained length (2048); the others ignore seq_len.
    for seq_len in (None, 100, 2048, 2049, 5000, 40000) if kind == "dynamic" else (None, 5000):
        expected, expected_factor = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)
        got, factor = rope.inv_freq(head_dim, theta, scaling, 2048, seq_len=seq_len)
        # The same fp32 operations in the same order: equal, within one rounding at most.
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=0)
        assert got.dtype == torch.float32 and got.shape == (head_dim // 2,)
        assert factor == pytest.approx(expected_factor, rel=1e-12)


def test_dynamic_is_unscaled_up_to_the_trained_length_and_reads_the_stated_one():
    scaling = {"rope_type": "dynamic", "factor": 4.0}
    plain, _ = rope.inv_freq(64, 1e4, None, 2048)
    torch.testing.assert_close(rope.inv_freq(64, 1e4, scaling, 2048, seq_len=2048)[0], plain, rtol=1e-7, atol=0)
    assert not torch.equal(rope.inv_freq(64, 1e4, scaling, 2048, seq_len=4096)[0], plain)
    stated = {**scaling, "original_max_position_embeddings": 2048}  # llmkit's dict may state it ...
    torch.testing.assert_close(rope.inv_freq(64, 1e4, stated, 8192, seq_len=4096)[0],  # ... over max_seq_len
                               rope.inv_freq(64, 1e4, scaling, 2048, seq_len=4096)[0], rtol=0, atol=0)
    assert rope.is_dynamic(scaling) and not rope.is_dynamic(None) and not rope.is_dynamic({"rope_type": "yarn"})


@pytest.mark.parametrize("scaling,max_seq_len,context", [
    (None, 8192, 8192),
    ({"rope_type": "linear", "factor": 8.0}, 131072, 131072),  # Gemma-3: max_seq_len is the scaled context
    ({"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 8192}, 32768, 32768),
    ({"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 8192}, 16384, 32768),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 32768, 131072),  # Qwen2.5
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, **LLAMA3}, 131072, 65536),
])
def test_effective_context(scaling, max_seq_len, context):
    config = ModelConfig.from_preset("llama-tiny", max_seq_len=max_seq_len, rope_scaling=scaling)
    assert rope.effective_context(config) == context
    assert f"{context:,} positions" in rope.describe(config)


@pytest.mark.parametrize("kind,keys", CASES, ids=[f"{k}-{v['factor']:g}" for k, v in CASES])
def test_config_json_round_trips_through_transformers(tmp_path, kind, keys):
    scaling = {"rope_type": kind, **keys}
    if kind == "dynamic":
        scaling["original_max_position_embeddings"] = 64  # written as max_position_embeddings
    ours = ModelConfig.from_preset("llama-tiny", max_seq_len=256, rope_theta=5e4, rope_scaling=scaling)
    LlamaConfig(**ours.to_hf_config()).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    back = ModelConfig.from_hf_config(hf)
    assert back.rope_scaling == scaling and back.rope_theta == 5e4
    # max_seq_len is raised to the scaled context where it is shorter (dynamic: the trained length x factor).
    reach = rope.effective_context(ours)
    assert back.max_seq_len == (reach if kind == "dynamic" else max(256, reach))
    # ... and transformers computes the same frequencies from what we wrote.
    config = AutoModelForCausalLM.from_config(LlamaConfig(**hf)).config
    expected, expected_factor = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=200)
    got, factor = rope.inv_freq(back.head_dim, back.rope_theta, back.rope_scaling, back.max_seq_len, seq_len=200)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


def test_transformers_v4_rope_scaling_is_read_and_the_trained_context_filled_in():
    hf = ModelConfig.from_preset("llama-tiny").to_hf_config()
    del hf["rope_parameters"]
    hf.update(max_position_embeddings=4096, rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0})
    config = ModelConfig.from_hf_config(hf)
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert config.rope_theta == 1e6 and config.max_seq_len == 16384  # raised to the scaled context
    hf["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    config = ModelConfig.from_hf_config(hf)
    assert config.rope_scaling["original_max_position_embeddings"] == 4096 and config.max_seq_len == 8192


@pytest.mark.parametrize("scaling,message", [
    ({"rope_type": "longrope", "factor": 4.0}, "type 'longrope' is not supported"),
    ("linear", "must be None or a dict"),
    ({"rope_type": "yarn", "factor": 4.0}, r"needs the key\(s\) \['original_max_position_embeddings'\]"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
     r"needs the key\(s\) \['high_freq_factor', 'low_freq_factor'\]"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 32}, r"key\(s\) \['beta_fast'\] that llmkit does not use"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"rope_type": "linear", "factor": 0}, "factor must be a positive number"),
    ({"rope_type": "linear", "factor": True}, "factor must be a positive number"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192.5}, "must be a positive integer"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192, "truncate": 1},
     "truncate must be true or false"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 4.0,
      "high_freq_factor": 1.0}, "high_freq_factor .* must be greater than low_freq_factor"),
    ({"rope_type": "linear", "type": "yarn", "factor": 2.0}, "rope_type='linear' and type='yarn'"),
])
def test_bad_rope_scaling_is_a_config_error(scaling, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_preset("llama-tiny", rope_scaling=scaling)


def test_bad_rope_scaling_in_config_json_names_the_file():
    hf = ModelConfig.from_preset("llama-tiny").to_hf_config()
    hf["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    with pytest.raises(ConfigError, match="config.json: rope_scaling partial_rotary_factor=0.5"):
        ModelConfig.from_hf_config(hf)
    hf["rope_parameters"] = {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}
    with pytest.raises(ConfigError, match="config.json: rope_parameters is nested by layer type"):
        ModelConfig.from_hf_config(hf)
    nested = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert rope.rope_from_hf(hf, rope=nested) == {"rope_theta": 1e6, "max_seq_len": 256,
                                                  "rope_scaling": {"rope_type": "linear", "factor": 8.0}}



def test_llmkit_info_shows_the_effective_context(tmp_path, capsys):
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    hf = ModelConfig.from_preset("llama-tiny", max_seq_len=8192, rope_scaling=scaling).to_hf_config()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert main(["info", str(tmp_path)]) == 0
    assert "context: 32,768 positions (yarn RoPE scaling: original 8,192 x factor 4)" in capsys.readouterr().out
    assert main(["info", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["effective_context"] == 32768

# ---- GGUF: llama.cpp's rope.scaling.* keys ----

def _meta(**rope_keys):
    meta = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.embedding_length": 64,
            "llama.block_count": 2, "llama.feed_forward_length": 192, "llama.vocab_size": 512,
            "llama.context_length": 4096, "llama.rope.freq_base": 1e4}
    return meta | {f"llama.rope.scaling.{k}": v for k, v in rope_keys.items()}


def test_gguf_yarn_and_linear_keys_are_read():
    config = config_from_metadata(_meta(type="yarn", factor=4.0, original_context_length=4096, yarn_beta_fast=32.0,
                                        finetuned=True), set(), "m.gguf")
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert config.max_seq_len == 16384
    config = config_from_metadata(_meta(type="linear", factor=2.0), set(), "m.gguf")
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0} and config.max_seq_len == 4096


@pytest.mark.parametrize("keys,names,message", [
    (dict(type="longrope", factor=4.0), set(), "rope.scaling.type 'longrope' is not supported"),
    (dict(type="yarn", factor=4.0, yarn_log_multiplier=0.1), set(), "yarn_log_multiplier = 0.1 is not supported"),
    (dict(type="yarn", factor=4.0, yarn_beta_fast=16.0), set(), "yarn_beta_fast = 16.0 is not supported"),
    (dict(type="yarn"), set(), "'llama.rope.scaling.factor' is missing"),
    ({}, {"rope_freqs.weight"}, "'rope_freqs.weight' .* is not supported"),
])
def test_gguf_rope_scaling_llmkit_cannot_compute_is_refused(keys, names, message):
    with pytest.raises(FormatError, match=message):
        config_from_metadata(_meta(**keys), names, "m.gguf")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 128},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_gguf_export_writes_linear_and_yarn(tiny, tmp_path, scaling):
    model, tok = tiny
    config = model.config.replace(rope_scaling=scaling, max_seq_len=256)
    write_gguf(tmp_path / "m.gguf", config, model.state_dict(), tok, quant="F32")
    back = read_gguf(tmp_path / "m.gguf")
    assert back.config.rope_scaling == scaling and back.config.max_seq_len == 256


@pytest.mark.parametrize("scaling,message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_scaling 'dynamic' is not supported"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64, **LLAMA3}, "'llama3'"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.2},
     r"\['attention_factor'\] is not supported"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16},
     r"\['beta_fast'\] is not supported"),
])
def test_gguf_export_refuses_what_llamacpp_has_no_key_for(tiny, tmp_path, scaling, message):
    model, tok = tiny
    with pytest.raises(ConfigError, match=message):
        write_gguf(tmp_path / "m.gguf", model.config.replace(rope_scaling=scaling), model.state_dict(), tok)
    assert not (tmp_path / "m.gguf").exists()


# ---- logits parity with transformers past the trained context ----

ORIGINAL = 32  # trained context of the tiny models; the test sequence is 3x longer
PARITY = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, 128),
    # transformers' dynamic NTK takes the trained length from max_position_embeddings.
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, ORIGINAL),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}, 128),
    "llama3": ({"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, **LLAMA3}, 128),
}


def _ids(seq, seed=1):
    return torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(seed))


def _randomize_norms(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("kind", PARITY)
def test_transformers_checkpoint_with_scaling_gives_the_same_logits(tmp_path, kind):
    scaling, max_pos = PARITY[kind]
    # head_dim 16, theta 1e4: wavelengths 6 to 6e3 positions, so llama3's three bands and YaRN's ramp are all used.
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                                      rope_parameters={**scaling, "rope_theta": 1e4}, rms_norm_eps=1e-5))
    hf = _randomize_norms(hf).eval()
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    assert rope.effective_context(ours.config) >= 3 * ORIGINAL
    with torch.no_grad():
        for seq in (3 * ORIGINAL, ORIGINAL - 5):  # past the trained context, then within it (dynamic resets)
            x = _ids(seq)
            torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", PARITY)
def test_llmkit_checkpoint_with_scaling_gives_the_same_logits_in_transformers(tmp_path, kind):
    scaling = {**PARITY[kind][0], "original_max_position_embeddings": ORIGINAL}
    config = ModelConfig.from_preset("llama-tiny", vocab_size=256, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                                     max_seq_len=4 * ORIGINAL, rope_scaling=scaling)
    ours = _randomize_norms(Transformer(config)).eval()
    ours.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = _ids(3 * ORIGINAL, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=0, atol=ATOL)


@needs_llamacpp
@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
], ids=["linear", "yarn"])
def test_gguf_export_with_scaling_computes_as_llama_cpp(tmp_path, scaling):
    """llama.cpp reads the keys we write and computes the same scaled RoPE past the trained context:
    F32 weights, so the only difference is llama.cpp's f16 KV cache (0.02, as tests/test_gguf_llamacpp.py)."""
    model, tok = tiny_model(d_model=128, d_ff=256, n_layer=2, std=0.1, seed=1)
    model = Transformer.from_state_dict(model.config.replace(rope_scaling=scaling), model.state_dict()).eval()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model.config, model.state_dict(), tok, quant="F32")
    ids = tok.encode(" ".join(CORPUS))[:120]  # well past the 32 trained positions
    reference = LlamaCpp(path, n_ctx=256)
    try:
        with torch.no_grad():
            stats = agreement(model(torch.tensor([ids]))[0].numpy(), reference.logits(ids))
    finally:
        reference.close()
    assert stats["max_abs_diff"] < 0.02 and stats["mean_kl"] < 1e-4, stats
