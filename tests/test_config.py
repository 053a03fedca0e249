"""ModelConfig: presets, the config.json round trip, and clear errors for bad values."""

import pytest

from llmkit import PRESETS, ConfigError, ModelConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips_through_hf_config(name):
    config = ModelConfig.from_preset(name)
    assert ModelConfig.from_hf_config(config.to_hf_config()) == config


def test_smollm2_preset_is_its_published_shape():
    c = ModelConfig.from_preset("smollm2-135m")
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.head_dim, c.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert c.to_hf_config()["model_type"] == "llama"


def test_gpt2_style_maps_to_gpt2_and_llama_style_to_llama():
    assert ModelConfig.from_preset("gpt2").to_hf_config()["model_type"] == "gpt2"
    assert ModelConfig.from_preset("llama-tiny").to_hf_config()["architectures"] == ["LlamaForCausalLM"]


def test_llama_d_ff_default_follows_the_two_thirds_rule():
    assert ModelConfig(d_model=4096, n_head=32).d_ff == 11008
    assert ModelConfig(d_model=768, n_head=12, gated_mlp=False, activation="gelu").d_ff == 3072


@pytest.mark.parametrize("changes, message", [
    (dict(d_model=96, n_head=6, n_kv_head=4), r"n_head=6 must be a multiple of n_kv_head=4"),
    (dict(d_model=65, n_head=4), r"d_model=65 is not divisible by n_head=4"),
    (dict(norm="batchnorm"), r"norm='batchnorm'; expected one of \('rmsnorm', 'layernorm'\)"),
    (dict(n_layer=0), r"ModelConfig.n_layer must be a positive integer, got 0"),
    (dict(dropout=1.5), r"dropout must be in \[0, 1\), got 1.5"),
    (dict(activation="swish2"), r"activation='swish2'; expected one of"),
])
def test_bad_values_raise_config_error(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**changes)


def test_unknown_field_and_preset():
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field\(s\) \['n_layers'\]"):
        ModelConfig.from_dict({"n_layers": 2})
    with pytest.raises(ConfigError, match=r"unknown preset 'gpt5'; known presets: \["):
        ModelConfig.from_preset("gpt5")


def test_a_combination_transformers_cannot_run_says_so():
    config = ModelConfig(pos_embedding="learned", norm="rmsnorm", gated_mlp=False)
    with pytest.raises(ConfigError, match="no transformers model_type computes this combination"):
        config.to_hf_config()


def test_unsupported_rope_type_in_hf_config():
    hf = ModelConfig.from_preset("llama-tiny").to_hf_config()
    hf["rope_parameters"] = {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}
    with pytest.raises(ConfigError, match="rope_scaling type 'longrope' is not supported"):
        ModelConfig.from_hf_config(hf)
