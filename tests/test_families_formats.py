"""Qwen2 and Gemma-3 (text) in llmkit's file formats: config.json both ways, HF folders both ways,
the real GGUFs read, our GGUF exports run by llama.cpp.

References are independent of llmkit: transformers' own config classes, models and GGUF loader, and
llama.cpp. The tiny models have >= 1 sliding and >= 1 full layer, a window shorter than the test
sequence, and norms and biases moved away from their initial values, so a wrong mapping cannot hide.
"""

from __future__ import annotations

import functools
import re
from unittest import mock

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf_helpers import needs_llamacpp, tiny_tokenizer

from llmkit import ConfigError, FormatError, ModelConfig
from llmkit.formats import hf
from llmkit.formats.gguf import read_gguf, write_gguf
from llmkit.formats.named import resolve

S, F = "sliding_attention", "full_attention"
WINDOW = 4
IDS = [[5, 17, 250, 3, 99, 42, 7, 311, 64, 12, 200, 9, 77, 150]]  # 14 tokens: longer than the window


def _qwen2_config(sliding: bool = True, **changes) -> transformers.Qwen2Config:
    sliding_fields = dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=[F, S, S]) if sliding else {}
    return transformers.Qwen2Config(**{
        **dict(vocab_size=tiny_tokenizer().vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False),
        **sliding_fields, **changes})


def _gemma3_config(**changes) -> transformers.Gemma3TextConfig:
    return transformers.Gemma3TextConfig(**{
        **dict(vocab_size=tiny_tokenizer().vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
               query_pre_attn_scalar=24, sliding_window=WINDOW, layer_types=[S, F, S], rms_norm_eps=1e-6,
               rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        **changes})


def _gemma3_exportable(**changes) -> transformers.Gemma3TextConfig:
    """llama.cpp's gemma3 scales queries by head_dim ** -0.5 (query_pre_attn_scalar = head_dim)."""
    return _gemma3_config(**{"query_pre_attn_scalar": 32, **changes})


def _qwen2_exportable(**changes) -> transformers.Qwen2Config:
    """llama.cpp's qwen2 has no sliding window."""
    return _qwen2_config(sliding=False, **changes)


def _random(config, seed: int = 0, std: float = 0.1):
    """A transformers model with every weight random: norms and biases too (Gemma's around 0, as its gain is 1 + w)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    gemma = config.model_type == "gemma3_text"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5) if gemma else p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model.eval()


# The test's own statement of the layout (HF name -> llmkit name), written independently of hf.py.
_RENAMES = {
    "qwen2": {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"},
    "gemma3_text": {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_post_norm",
                    "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_post_norm"},
}


def _ours(hf_name: str, model_type: str) -> str:
    name = re.sub(r"^model\.layers\.(\d+)\.", r"blocks.\1.", hf_name)
    name = name.replace("model.embed_tokens.", "embed.").replace("model.norm.", "norm.").replace("self_attn.", "attn.")
    for old, new in _RENAMES[model_type].items():
        name = name.replace(f".{old}.", f".{new}.")
    return name


def _assert_same_tensors(ours: dict[str, torch.Tensor], hf_model) -> None:
    expected = {_ours(k, hf_model.config.model_type): v for k, v in hf_model.state_dict().items()}
    assert sorted(ours) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(ours[name], t), name


# ---- config.json ------------------------------------------------------------------------------


def _qwen2_ours(**changes) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=400, n_layer=3, n_head=4, n_kv_head=2, d_model=64, d_ff=96, qkv_bias=True,
                                 rope_theta=1e6, norm_eps=1e-6, sliding_window=WINDOW, layer_types=[F, S, S]),
                          **changes})


def _gemma3_ours(**changes) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=400, n_layer=3, n_head=4, n_kv_head=2, d_model=64, head_dim=32, d_ff=96,
                                 norm_offset=1.0, qk_norm=True, sandwich_norm=True, embed_scale=True,
                                 activation="gelu_tanh", attn_scale=24 ** -0.5, rope_theta=1e6, rope_local_theta=1e4,
                                 sliding_window=WINDOW, layer_types=[S, F, S], norm_eps=1e-6, tie_embeddings=True,
                                 bos_token_id=2, eos_token_id=1, pad_token_id=0), **changes})


@pytest.mark.parametrize("ours, cls", [
    (_qwen2_ours(), transformers.Qwen2Config),
    (_qwen2_ours(sliding_window=None, layer_types=None, tie_embeddings=True,
                 rope_scaling={"rope_type": "linear", "factor": 4.0}), transformers.Qwen2Config),
    (_qwen2_ours(layer_types=None), transformers.Qwen2Config),  # every layer sliding
    (_gemma3_ours(), transformers.Gemma3TextConfig),
    (_gemma3_ours(rope_scaling={"rope_type": "linear", "factor": 8.0}, tie_embeddings=False, num_labels=3),
     transformers.Gemma3TextConfig),
])
def test_config_round_trips_through_transformers_config_classes(ours, cls):
    """ours -> config.json -> transformers' class (which validates and standardizes it) -> its dict -> ours."""
    theirs = cls(**ours.to_hf_config())
    assert ModelConfig.from_hf_config(theirs.to_dict()) == ours
    assert theirs.layer_types == [ours.layer_type(i) for i in range(ours.n_layer)]


def test_gemma3_config_json_is_what_transformers_reads():
    theirs = transformers.Gemma3TextConfig(**_gemma3_ours(rope_scaling={"rope_type": "linear", "factor": 8.0})
                                           .to_hf_config())
    assert theirs.query_pre_attn_scalar == 24 and theirs.sliding_window == WINDOW
    assert theirs.rope_parameters == {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert theirs.final_logit_softcapping is None and theirs.attn_logit_softcapping is None
    assert theirs.hidden_activation == "gelu_pytorch_tanh" and theirs.tie_word_embeddings


def test_v4_style_keys_read_like_v5():
    """transformers 4.x wrote rope_theta / rope_scaling / rope_local_base_freq / sliding_window_pattern."""
    v5 = _gemma3_ours(layer_types=[S, S, F, S, S, F], n_layer=6, rope_scaling={"rope_type": "linear", "factor": 8.0})
    v4 = {k: v for k, v in v5.to_hf_config().items() if k not in ("rope_parameters", "layer_types")}
    v4["sliding_window_pattern"] = 3
    assert ModelConfig.from_hf_config(v4) == v5
    q5 = _qwen2_ours(layer_types=[F, S, S])
    q4 = {k: v for k, v in q5.to_hf_config().items() if k not in ("rope_parameters", "layer_types")}
    assert q4["max_window_layers"] == 1 and ModelConfig.from_hf_config(q4) == q5


def test_transformers_own_configs_read():
    """Configs exactly as transformers writes them (its defaults included)."""
    gemma = ModelConfig.from_hf_config(_gemma3_config().to_dict())
    assert (gemma.hf_model_type, gemma.attn_scale, gemma.rope_local_theta, gemma.layer_types) == \
        ("gemma3_text", 24 ** -0.5, 1e4, [S, F, S])
    assert gemma.tie_embeddings and (gemma.bos_token_id, gemma.eos_token_id, gemma.pad_token_id) == (2, 1, 0)
    qwen = ModelConfig.from_hf_config(_qwen2_config(sliding=False).to_dict())
    assert (qwen.hf_model_type, qwen.qkv_bias, qwen.sliding_window, qwen.layer_types) == ("qwen2", True, None, None)


@pytest.mark.parametrize("changes, message", [
    (dict(norm_offset=1.0), r"llama needs norm_offset=0.0 \(got 1.0\).*gemma3_text needs qk_norm=True"),
    (dict(qkv_bias=True), None),  # qwen2: fits
    (dict(sliding_window=8), r"llama needs no sliding_attention layers \(got sliding_window=8\)"),
    (dict(qkv_bias=True, rope_local_theta=1e4), r"qwen2 needs rope_local_theta=None \(got 10000.0\)"),
])
def test_hf_model_type_names_the_fields(changes, message):
    config = ModelConfig(d_model=64, n_head=4, **changes)
    if message is None:
        assert config.hf_model_type == "qwen2"
        return
    with pytest.raises(ConfigError, match="no transformers model_type computes this combination of fields: " + ".*"
                       + message):
        config.hf_model_type  # noqa: B018 - the property raises


@pytest.mark.parametrize("key, value, message", [
    ("attn_logit_softcapping", 50.0, "attn_logit_softcapping=50.0 is not supported"),
    ("use_bidirectional_attention", True, "use_bidirectional_attention=True is not supported"),
    ("model_type", "gemma3", "model_type 'gemma3' is the multimodal Gemma3ForConditionalGeneration"),
    ("model_type", "qwen3", r"unsupported model_type 'qwen3'; llmkit reads 'gpt2', 'llama', 'mistral', 'qwen2', "
                            "'gemma3_text'"),
    ("rope_parameters", {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "sliding_attention has rope_type 'linear'"),
])
def test_gemma3_config_json_refusals(key, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_config({**_gemma3_ours().to_hf_config(), key: value}, source="x/config.json")


# ---- HF folders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_qwen2_config, _gemma3_config])
def test_transformers_folder_reads_with_every_tensor_equal(make, tmp_path):
    theirs = _random(make())
    theirs.save_pretrained(tmp_path)
    config, tensors = hf.load_checkpoint(tmp_path)
    assert config == ModelConfig.from_hf_config(theirs.config.to_dict())
    assert config.layer_types == theirs.config.layer_types and config.sliding_window == WINDOW
    _assert_same_tensors(tensors, theirs)


@pytest.mark.parametrize("make", [_qwen2_config, _gemma3_config])
def test_folder_we_save_loads_in_transformers(make, tmp_path):
    """Tensors read from transformers' folder, saved by us, loaded by transformers: every tensor equal."""
    theirs = _random(make(tie_word_embeddings=True))
    theirs.save_pretrained(tmp_path / "theirs")
    config, tensors = hf.load_checkpoint(tmp_path / "theirs")
    hf.save_checkpoint(tmp_path / "ours", config, tensors)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    assert type(back) is type(theirs)
    for key in ("layer_types", "sliding_window", "rope_parameters", "tie_word_embeddings"):
        assert getattr(back.config, key) == getattr(theirs.config, key), key
    if config.hf_model_type == "gemma3_text":
        assert (back.config.query_pre_attn_scalar, back.config.head_dim) == (24, 32)
    _assert_same_tensors(tensors, back)


@pytest.mark.parametrize("ours, cls", [(_qwen2_ours(vocab_size=400), "Qwen2ForSequenceClassification"),
                                       (_gemma3_ours(), "Gemma3TextForSequenceClassification")])
def test_sequence_classifiers_save_and_load(ours, cls, tmp_path):
    config = ours.replace(num_labels=3)
    theirs = getattr(transformers, cls)(transformers.AutoConfig.for_model(**config.to_hf_config())).eval()
    theirs.save_pretrained(tmp_path)
    read, tensors = hf.load_checkpoint(tmp_path)
    assert read == config and tensors["score.weight"].shape == (3, 64)
    hf.save_checkpoint(tmp_path / "ours", read, tensors)
    assert type(transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours")).__name__ == cls


def test_bad_folders(tmp_path):
    """Missing, unexpected and misshapen tensors are named before any weight is read."""
    from safetensors.torch import load_file, save_file

    _random(_gemma3_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    good = load_file(weights)
    save_file({k: v for k, v in good.items() if k != "model.layers.1.self_attn.k_norm.weight"}, weights)
    with pytest.raises(FormatError, match=r"tensor 'model.layers.1.self_attn.k_norm.weight' is missing"):
        hf.load_checkpoint(tmp_path)
    save_file({**good, "model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}, weights)
    with pytest.raises(FormatError, match=r"unexpected tensor\(s\) \['model.layers.0.self_attn.q_proj.bias'\] for "
                                          "model_type 'gemma3_text'"):
        hf.load_checkpoint(tmp_path)
    save_file({**good, "model.layers.2.post_feedforward_layernorm.weight": torch.zeros(32)}, weights)
    with pytest.raises(FormatError, match=r"'model.layers.2.post_feedforward_layernorm.weight' has shape \[32\], "
                                          r"expected \[64\]"):
        hf.load_checkpoint(tmp_path)


# ---- the real GGUFs ------------------------------------------------------------------------------

QWEN25 = "qwen2.5-coder-0.5b-instruct"
GEMMA3 = "gemma-3-270m"
# A few tensors of each kind, compared with transformers' own GGUF loader (dequantizing all of a file
# takes minutes on 2 cores; the name maps and value transforms are what can go wrong, per kind).
_SAMPLE = ("token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_q.bias", "blk.0.attn_k.weight",
           "blk.0.attn_k.bias", "blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight", "blk.5.attn_norm.weight",
           "blk.5.post_attention_norm.weight", "blk.5.ffn_norm.weight", "blk.5.post_ffw_norm.weight",
           "blk.5.ffn_down.weight", "output.weight")


_GGUFReader = gguf.GGUFReader


@functools.cache
def _reader(path: str):
    return _GGUFReader(path)


def _one_parse(path):
    """Both readers share one GGUFReader per file (parsing the metadata of a 262k vocabulary takes ~20 s)."""
    return mock.patch.object(gguf, "GGUFReader", lambda p, *args, **kwargs: _reader(str(p)))


@functools.cache
def _real(name: str):
    """(llmkit's contents with the sample tensors, transformers' config, transformers' sample tensors by GGUF name)."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    path = str(resolve(name))
    with _one_parse(path):
        parsed = load_gguf_checkpoint(path, return_tensors=False)
        arch = _reader(path).fields["general.architecture"].contents()
        hf_config = transformers.AutoConfig.for_model(**parsed["config"])
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(hf_config)
        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
        names = get_gguf_hf_weights_map(skeleton, processor)
        theirs = {}
        for t in _reader(path).tensors:
            if t.name in _SAMPLE:
                result = processor.process(weights=gguf.dequantize(t.data, t.tensor_type), name=t.name,
                                           tensor_key_mapping=names, parsed_parameters=parsed)
                theirs[t.name] = (names[t.name], torch.from_numpy(result.weights.copy()))
        probe = ModelConfig.from_hf_config({**hf_config.to_dict(), "model_type": hf_config.model_type})
        ours = read_gguf(path, with_tokenizer=False, only={_ours(n, probe.hf_model_type) for n, _ in theirs.values()})
    return ours, hf_config, theirs


@pytest.mark.slow
@pytest.mark.parametrize("name, model_type", [(QWEN25, "qwen2"), (GEMMA3, "gemma3_text")])
def test_real_gguf_tensors_equal_transformers_gguf_loader(name, model_type):
    ours, _, theirs = _real(name)
    assert ours.config.hf_model_type == model_type
    assert len(theirs) >= 6
    for g, (hf_name, expected) in theirs.items():
        got = ours.tensors[_ours(hf_name, model_type)]
        assert torch.equal(got, expected.reshape(got.shape)), g  # same dequantizer, same -1: bit-identical


@pytest.mark.slow
@pytest.mark.parametrize("name, shape", [(QWEN25, (24, 896, 14, 2, 64, 4864, 151936)),
                                         (GEMMA3, (18, 640, 4, 1, 256, 2048, 262144))])
def test_real_gguf_config(name, shape):
    ours, theirs, _ = _real(name)
    c = ours.config
    print(c)
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.head_dim, c.d_ff, c.vocab_size) == shape
    if name == QWEN25:
        assert c.qkv_bias and not c.bias and c.rope_theta == 1e6 and not c.tie_embeddings and c.sliding_window is None
    else:
        assert c.sliding_window == 512 and c.layer_types == [S, S, S, S, S, F] * 3
        assert (c.rope_theta, c.rope_local_theta, c.attn_scale) == (1e6, 1e4, 256 ** -0.5)
        assert c.norm_offset == 1.0 and c.qk_norm and c.sandwich_norm and c.embed_scale and c.tie_embeddings
    # transformers' reading of the same metadata (its config classes' defaults fill what GGUF omits); it keeps
    # the float32 epsilon (9.99999997e-07), which llmkit reads back as the 1e-06 it was written from
    assert ModelConfig.from_hf_config(theirs.to_dict()).replace(name=c.name, norm_eps=1e-6) == c


# ---- GGUF export --------------------------------------------------------------------------------


def _exported(make, tmp_path, quant="F32"):
    theirs = _random(make())
    theirs.save_pretrained(tmp_path / "hf")
    config, tensors = hf.load_checkpoint(tmp_path / "hf")
    path = tmp_path / "model.gguf"
    write_gguf(path, config, tensors, tiny_tokenizer(), quant=quant)
    return theirs, config, tensors, path


def _same_model(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal but for the name and the token ids (GGUF takes those from the tokenizer)."""
    ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return a.replace(**ids) == b.replace(**ids)


@pytest.mark.parametrize("make", [_qwen2_exportable, _gemma3_exportable])
def test_f32_export_reads_back_exactly(make, tmp_path):
    _, config, tensors, path = _exported(make, tmp_path)
    back = read_gguf(path)
    assert _same_model(back.config, config)
    assert sorted(back.tensors) == sorted(tensors)
    shifted = config.norm_offset == 1.0  # gemma3 norms are stored as w + 1: (w + 1) - 1 rounds w to 2**-24
    for name, t in tensors.items():
        if shifted and name.endswith("norm.weight"):
            torch.testing.assert_close(back.tensors[name], t, atol=2.0 ** -24, rtol=0)
        else:
            assert torch.equal(back.tensors[name], t), name
    stored = back.metadata
    if config.hf_model_type == "gemma3_text":  # norms stored +1, as llama.cpp's converter does
        r = gguf.GGUFReader(str(path))
        raw = {t.name: t for t in r.tensors}["blk.0.post_ffw_norm.weight"]
        assert torch.equal(torch.from_numpy(raw.data.copy()), tensors["blocks.0.mlp_post_norm.weight"] + 1)
        assert stored["gemma3.attention.sliding_window_pattern"] == [True, False, True]
        assert stored["gemma3.rope.freq_base_swa"] == 1e4


@pytest.mark.parametrize("config, message", [
    (_qwen2_ours(vocab_size=400), "qwen2 model with sliding_window=4 is not supported"),
    (_qwen2_ours(vocab_size=400, sliding_window=None, layer_types=None, head_dim=32),
     "head_dim=32 != d_model/n_head"),
    (_gemma3_ours(), r"attn_scale=0.204\d* is not supported: llama.cpp's gemma3 with 3 layers scales queries by 32"),
    (_gemma3_ours(attn_scale=32 ** -0.5, activation="silu"), "activation='silu' is not supported"),
    (_qwen2_ours(vocab_size=400, qkv_bias=False, bias=True, sliding_window=None, layer_types=None),
     "llama models with biases"),
])
def test_export_refuses_what_llama_cpp_computes_differently(config, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        write_gguf(tmp_path / "x.gguf", config, {}, tiny_tokenizer(), quant="F32")
    assert not (tmp_path / "x.gguf").exists()


def _rewrite_gguf(path, out, meta=None, drop=()):
    """A copy of the GGUF at `path` with metadata values replaced (`meta`) and tensors left out (`drop`)."""
    r = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(out), str(r.fields["general.architecture"].contents()))
    for key, f in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            value = (meta or {}).get(key, f.contents())
            w.add_key_value(key, value, f.types[0], f.types[1] if len(f.types) > 1 else None)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, t.data.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_bad_gguf_files(tmp_path):
    """Each disagreement between a GGUF's metadata and its tensors is one error naming it, never a partial load."""
    _, config, tensors, path = _exported(_gemma3_exportable, tmp_path)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="truncated"):
        read_gguf(tmp_path / "cut.gguf")
    # metadata says 2 layers, the tensors hold 3
    more = _rewrite_gguf(path, tmp_path / "more.gguf", {"gemma3.block_count": 2,
                                                        "gemma3.attention.sliding_window_pattern": [True, False]})
    with pytest.raises(FormatError, match=r"unexpected tensor\(s\) \['blk.2.attn_k.weight'.* for a 2-layer gemma3"):
        read_gguf(more)
    fewer = _rewrite_gguf(path, tmp_path / "fewer.gguf", drop={"blk.1.ffn_down.weight"})
    with pytest.raises(FormatError, match=r"tensor 'blk.1.ffn_down.weight' is missing \(architecture gemma3, 3 layers\)"):
        read_gguf(fewer)
    wider = _rewrite_gguf(path, tmp_path / "wider.gguf", {"gemma3.feed_forward_length": 128})
    with pytest.raises(FormatError, match=r"tensor 'blk.0.ffn_(gate|up|down).weight' has shape \[\d+, \d+\], expected"):
        read_gguf(wider)


# ---- logits: llama.cpp runs our exports --------------------------------------------------------

# Measured max |difference| from transformers on logits up to ~4, with llama.cpp's KV cache in F32:
# qwen2 2e-6 (float32 rounding); gemma3 1.0e-3, from llama.cpp's GELU, which looks up an fp16 table
# (emulating that table in transformers brings it to 2e-4). A wrong layer pattern or RoPE base gives
# 0.86 to 3.1 on the same model, so these bounds still catch every layout mistake.
LLAMACPP_ATOL = {"qwen2": 1e-4, "gemma3_text": 3e-3}


@needs_llamacpp
@pytest.mark.parametrize("make", [_qwen2_exportable, _gemma3_exportable,
                                  functools.partial(_gemma3_exportable, layer_types=[S, S, S, S, S, F],
                                                    num_hidden_layers=6)])
def test_llama_cpp_runs_our_f32_export_like_transformers(make, tmp_path):
    """Our GGUF (F32) of a random transformers model: llama.cpp's logits equal transformers'.
    The 3-layer Gemma has its own layer pattern (written per layer); the 6-layer one llama.cpp's default."""
    from llama_cpp import GGML_TYPE_F32, Llama

    theirs, config, _, path = _exported(make, tmp_path)
    with torch.no_grad():
        expected = theirs(torch.tensor(IDS)).logits[0]
    llm = Llama(str(path), n_ctx=64, logits_all=True, n_gpu_layers=0, verbose=False, type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32)  # its default f16 cache alone differs by 2e-3
    try:
        llm.eval(IDS[0])
        got = torch.from_numpy(np.array(llm.scores[: len(IDS[0])], dtype=np.float32))
    finally:
        llm.close()
    torch.testing.assert_close(got, expected, atol=LLAMACPP_ATOL[config.hf_model_type], rtol=0)


# ---- logits: llmkit's Transformer (needs the wave-2 model) ---------------------------------------

# Same float32 math in the same order up to matmul blocking: 1e-5 absolute.
PARITY_ATOL = 1e-5


@pytest.mark.parametrize("make", [_qwen2_config, _gemma3_config])
def test_logits_equal_transformers_both_directions(make, tmp_path):
    from llmkit.model import Transformer

    theirs = _random(make())
    theirs.save_pretrained(tmp_path / "theirs")
    ids = torch.tensor(IDS)
    ours = Transformer.from_pretrained(tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=PARITY_ATOL, rtol=0)

    torch.manual_seed(1)
    mine = Transformer(ours.config).eval()
    with torch.no_grad():
        for name, p in mine.named_parameters():
            p.normal_(0.0, 0.1) if p.dim() > 1 or not name.endswith("norm.weight") else p.uniform_(0.5, 1.5)
    mine.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, mine(ids), atol=PARITY_ATOL, rtol=0)


def test_saving_a_tensor_the_layout_has_no_place_for_is_refused(tmp_path):
    """A weight that the family's tensor map does not name is refused by name, not dropped from the
    checkpoint (a U-net's skip weights once were, before the map named them)."""
    from llmkit import Transformer

    config = ModelConfig.from_preset("llama-tiny")
    state = {**Transformer(config).state_dict(), "blocks.0.attn.extra_gain": torch.ones(3)}
    with pytest.raises(FormatError, match=r"1 tensor\(s\) the llama layout has no place for: \['blocks.0.attn.extra_gain'\]"):
        hf.save_checkpoint(tmp_path / "ckpt", config, state)
    assert not (tmp_path / "ckpt" / "config.json").exists()
