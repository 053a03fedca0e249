"""The speedruns' architecture options as ModelConfig fields: ReLU^2 and logit soft-capping against
transformers, value residuals and U-net skips against the same sums written by hand, QK-norm outside
Gemma-3; each saved
in config.json and read back, and the ones transformers cannot compute refused at export by name.

Tolerances: fp32 logits of the same weights through another implementation agree to ~1e-6 (the sums
run in another order); 1e-5 leaves room for that and nothing else."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from test_families_formats import _gemma3_config, _random

from llmkit import ModelConfig, Transformer
from llmkit.config import LLMKIT_FIELDS
from llmkit.errors import ConfigError
from llmkit.formats import hf
from llmkit.formats.gguf import gguf_arch

TOL = 1e-5


def _tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(seed))


def _llama(**changes) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{**dict(vocab_size=300, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64), **changes})


@pytest.mark.parametrize("config, field", [
    (_llama(hidden_act="relu2"), ("activation", "relu2")),  # gated: down(relu(gate)^2 * up)
    (_gemma3_config(final_logit_softcapping=2.0), ("logit_softcap", 2.0)),  # a cap low enough to bend logits
])
def test_relu2_and_softcap_match_transformers(config, field, tmp_path):
    theirs = _random(config)
    theirs.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    assert getattr(ours.config, field[0]) == field[1]
    ids = _tokens(config.vocab_size)
    with torch.no_grad():
        expected = theirs(ids).logits
        torch.testing.assert_close(ours(ids), expected, rtol=0, atol=TOL)
        # the fused, chunked loss (logits never formed) on the capped logits, as transformers' loss
        labels = torch.roll(ids, -1, 1)
        loss = F.cross_entropy(expected.flatten(0, 1), labels.flatten())
        torch.testing.assert_close(ours(ids, labels=labels), loss, rtol=0, atol=TOL)
    if field[0] == "logit_softcap":
        assert expected.abs().max() < 2.0  # the cap is in force
    ours.save_pretrained(tmp_path / "again")  # and it writes the field back where transformers reads it
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    assert getattr(again.config, {"activation": "hidden_act", "logit_softcap": "final_logit_softcapping"}[field[0]]) \
        == field[1]


def test_softcap_gradients_through_the_fused_loss_equal_autograd():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", logit_softcap=3.0))
    ids = _tokens(512)
    labels = torch.roll(ids, -1, 1)
    fused = torch.autograd.grad(model(ids, labels=labels), model.parameters())
    plain = torch.autograd.grad(F.cross_entropy(model(ids).flatten(0, 1), labels.flatten()), model.parameters())
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_value_residual_is_the_hand_written_mix():
    """Layer i > 0 attends with l_i * v_i + (1 - l_i) * v_0: the same weights without the option, with that
    mix patched into each v_proj's output by hand, give the same logits."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("llama-tiny", n_layer=3)
    mixing = Transformer(config.replace(value_residual=True)).eval()
    mixes = [0.0, 0.3]  # layer 1 attends with layer 0's values only
    with torch.no_grad():
        for block, mix in zip(mixing.blocks[1:], mixes, strict=True):
            block.attn.value_mix.fill_(mix)
    plain = Transformer(config).eval()
    plain.load_state_dict({k: v for k, v in mixing.state_dict().items() if "value_mix" not in k})
    first = {}
    plain.blocks[0].attn.v_proj.register_forward_hook(lambda m, args, out: first.update(v=out))
    for block, mix in zip(plain.blocks[1:], mixes, strict=True):
        block.attn.v_proj.register_forward_hook(lambda m, args, out, mix=mix: mix * out + (1 - mix) * first["v"])
    ids = _tokens(512)
    with torch.no_grad():
        torch.testing.assert_close(mixing(ids), plain(ids), rtol=0, atol=TOL)
        unmixed = Transformer(config).eval()
        unmixed.load_state_dict(plain.state_dict())
        assert (mixing(ids) - unmixed(ids)).abs().max() > 1e-3  # the mix changes the logits
    assert Transformer(config.replace(value_residual=True)).blocks[1].attn.value_mix.item() == 0.5  # initial mix


def test_unet_skips_are_the_hand_written_sums():
    """With 5 layers, layer 3 adds w_0 x (layer 1's output) to its input and layer 4 adds w_1 x (layer
    0's); the same weights without the option, with those sums patched in by hooks, give the same logits."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("llama-tiny", n_layer=5)
    skipping = Transformer(config.replace(unet_skips=True)).eval()
    assert skipping.skip_weights.tolist() == [1.0, 1.0]  # initial weights
    with torch.no_grad():
        skipping.skip_weights.copy_(torch.tensor([0.5, -0.25]))
    plain = Transformer(config).eval()
    plain.load_state_dict({k: v for k, v in skipping.state_dict().items() if k != "skip_weights"})
    outs = {}
    for i in (0, 1):
        plain.blocks[i].register_forward_hook(lambda m, args, out, i=i: outs.update({i: out}))
    for i, (source, w) in {3: (1, 0.5), 4: (0, -0.25)}.items():
        plain.blocks[i].register_forward_pre_hook(lambda m, args, source=source, w=w: (args[0] + w * outs[source],
                                                                                        *args[1:]))
    ids = _tokens(512)
    with torch.no_grad():
        torch.testing.assert_close(skipping(ids), plain(ids), rtol=0, atol=TOL)
        unskipped = Transformer(config).eval()
        unskipped.load_state_dict(plain.state_dict())
        assert (skipping(ids) - unskipped(ids)).abs().max() > 1e-3  # the skips change the logits
    loss = skipping(ids, labels=ids)
    loss.backward()
    assert skipping.skip_weights.grad.abs().min() > 0  # learned
    with pytest.raises(ConfigError, match="unet_skips is a decoder option for 2 layers or more"):
        ModelConfig.from_preset("llama-tiny", n_layer=1, unet_skips=True)


@pytest.mark.parametrize("changes", [dict(value_residual=True), dict(logit_softcap=30.0), dict(qk_norm=True),
                                     dict(unet_skips=True),
                                     dict(value_residual=True, logit_softcap=15.0, qk_norm=True, activation="relu2",
                                          tie_embeddings=False)])
def test_llmkit_only_fields_save_load_and_are_refused_at_export(changes, tmp_path):
    config = ModelConfig.from_preset("llama-tiny", **changes)
    model = Transformer(config).eval()
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    extras = {k: changes[k] for k in LLMKIT_FIELDS if k in changes}
    assert (written["model_type"], written["llmkit_base_model_type"], written["llmkit"]) == ("llmkit", "llama", extras)
    back = Transformer.from_pretrained(tmp_path)
    assert back.config == config
    ids = _tokens(512)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    with pytest.raises(ValueError, match="llmkit"):  # transformers refuses it rather than load a llama without them
        transformers.AutoConfig.from_pretrained(tmp_path)
    named = ", ".join(f"{k}={v!r}" for k, v in extras.items())
    with pytest.raises(ConfigError, match=f"cannot export to GGUF: {named} (is|are) llmkit's own"):
        gguf_arch(config)
    with pytest.raises(ConfigError, match=f"cannot export to transformers: {named}"):
        config.check_exportable("transformers")


def test_an_unknown_llmkit_field_is_refused_by_name(tmp_path):
    Transformer(ModelConfig.from_preset("llama-tiny", value_residual=True)).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    written["llmkit"]["unet_skip"] = True
    (tmp_path / "config.json").write_text(json.dumps(written))
    with pytest.raises(Exception, match=r"unknown llmkit field\(s\) \['unet_skip'\]"):
        hf.read_config(tmp_path)


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="logit_softcap must be positive or None, got 0"):
        ModelConfig.from_preset("llama-tiny", logit_softcap=0)
    with pytest.raises(ConfigError, match="activation='relu3'; expected one of"):
        ModelConfig.from_preset("llama-tiny", activation="relu3")


def test_pretrain_takes_the_options_on_a_preset(tmp_path):
    from llmkit.train.pretrain import PretrainConfig, build_model

    model = build_model(PretrainConfig(model="llama-tiny", model_options="qk_norm=true, logit_softcap=15,"
                                                                           "activation=relu2,value_residual=yes"), 300)
    c = model.config
    assert (c.qk_norm, c.logit_softcap, c.activation, c.value_residual, c.vocab_size) == (True, 15, "relu2", True, 300)
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field\(s\) \['qk_nrom'\]"):
        build_model(PretrainConfig(model="llama-tiny", model_options="qk_nrom=true"), 300)
    with pytest.raises(ConfigError, match="model option 'qk_norm': expected FIELD=VALUE"):
        build_model(PretrainConfig(model="llama-tiny", model_options="qk_norm"), 300)
    model.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="with a checkpoint folder"):
        build_model(PretrainConfig(model=str(tmp_path), model_options="qk_norm=true"), 300)


def test_value_residual_and_unet_skips_refuse_pipeline_stages():
    from llmkit.train import parallel

    config = ModelConfig.from_preset("llama-tiny", value_residual=True)
    with pytest.raises(ConfigError, match="value_residual .every layer reads layer 0's values"):
        parallel.check(parallel.ParallelConfig(pp=2), config, 2)
    with pytest.raises(ConfigError, match="unet_skips .the second half's layers read"):
        parallel.check(parallel.ParallelConfig(pp=2), config.replace(value_residual=False, unet_skips=True), 2)


def test_a_gemma3_with_a_value_residual_keeps_its_qk_norm(tmp_path):
    """Each family is asked only for the llmkit fields it fixes: Gemma-3's QK-norm is its own, not llmkit's."""
    from test_families_formats import _gemma3_ours

    config = _gemma3_ours(value_residual=True)
    assert (config.hf_model_type, config.llmkit_only) == ("gemma3_text", {"value_residual": True})
    model = Transformer(config).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["llmkit"] == {"value_residual": True}
    ids = _tokens(400)
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(tmp_path)(ids), model(ids))
    assert _gemma3_ours(logit_softcap=30.0).llmkit_only == {}  # Gemma-3 computes a soft-cap itself
