"""Hugging Face checkpoint folders in and out: config.json + safetensors <-> (ModelConfig, tensors).

Every weight-name mapping between llmkit and transformers lives in `tensor_map`: GPT-2's, and one
for the llama / qwen2 / gemma3_text layout that the config's fields (biases, q/k norms, sandwich norms)
fill in. Loading checks the whole folder before a byte of weights is read: the config, each
safetensors header (a truncated file is caught by the tensor that runs past its end), the names
and the shapes; any problem is one `FormatError` naming the file and the tensor. This module never
imports the model: `Transformer.from_pretrained` / `save_pretrained` call it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmkit.config import ENCODER_FAMILIES, ModelConfig
from llmkit.errors import ConfigError, FormatError, StorageError
from llmkit.files import atomic_path, atomic_write_json, read_json

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"

# Buffers some transformers versions save that carry no weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq", "embeddings.position_ids")
# BertForMaskedLM's decoder is the word embedding and its bias is cls.predictions.bias (older files repeat them).
_BERT_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


@dataclass(frozen=True)
class _Entry:
    """One tensor in the HF file and the llmkit tensor(s) it becomes.

    kind: "copy" (same layout), "transpose" (GPT-2's Conv1D stores [in, out]), "qkv"
    (GPT-2's fused c_attn, transposed, split into q, k, v), "expert" (one expert's matrix, row
    `expert` of our stacked (experts, out, in) tensor), "pairs" (RoFormer's q/k rows rotate in adjacent
    pairs, llmkit's in halves of each of `heads` heads: the rows are reordered) or "sinusoid"
    (RoFormer's stored table of positions: written from the formula, checked against it on reading).
    """

    hf: str
    shape: tuple[int, ...]
    ours: tuple[str, ...]
    kind: str = "copy"
    expert: int = 0
    heads: int = 0


def tensor_map(config: ModelConfig) -> list[_Entry]:
    c = config
    model_type = c.hf_model_type
    if model_type in ENCODER_FAMILIES:
        return _encoder_map(c, model_type)
    if model_type != "gpt2":
        return _decoder_map(c) + _score_entries(c)
    E: list[_Entry] = []
    # gpt2: Conv1D weights are stored transposed ([in, out]); q, k, v are fused in c_attn.
    d, t = c.d_model, "transformer"
    E.append(_Entry(f"{t}.wte.weight", (c.vocab_size, d), ("embed.weight",)))
    E.append(_Entry(f"{t}.wpe.weight", (c.max_seq_len, d), ("pos_embed.weight",)))
    for i in range(c.n_layer):
        h, o = f"{t}.h.{i}", f"blocks.{i}"
        for hf_norm, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            for p in ("weight", "bias"):
                E.append(_Entry(f"{h}.{hf_norm}.{p}", (d,), (f"{o}.{ours}.{p}",)))
        E.append(_Entry(f"{h}.attn.c_attn.weight", (d, 3 * d),
                        tuple(f"{o}.attn.{n}_proj.weight" for n in "qkv"), "qkv"))
        E.append(_Entry(f"{h}.attn.c_attn.bias", (3 * d,), tuple(f"{o}.attn.{n}_proj.bias" for n in "qkv"), "qkv"))
        for hf_lin, ours, shape in (("attn.c_proj", "attn.o_proj", (d, d)), ("mlp.c_fc", "mlp.up_proj", (d, c.d_ff)),
                                    ("mlp.c_proj", "mlp.down_proj", (c.d_ff, d))):
            E.append(_Entry(f"{h}.{hf_lin}.weight", shape, (f"{o}.{ours}.weight",), "transpose"))
            E.append(_Entry(f"{h}.{hf_lin}.bias", (shape[1],), (f"{o}.{ours}.bias",)))
    E.append(_Entry(f"{t}.ln_f.weight", (d,), ("norm.weight",)))
    E.append(_Entry(f"{t}.ln_f.bias", (d,), ("norm.bias",)))
    return E + _score_entries(c)


def _decoder_map(c: ModelConfig) -> list[_Entry]:
    """llama, qwen2 and gemma3_text: one layout (model.layers.N...), with each family's extra tensors.

    Gemma's norm weights are stored as HF stores them (gain = 1 + w; our norm_offset adds the 1).
    """
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    biased = ("q", "k", "v", "o") if c.bias else ("q", "k", "v") if c.qkv_bias else ()
    # HF norm name -> ours: Gemma-3 puts a second norm after each sublayer (sandwich) and its
    # pre-MLP norm is pre_feedforward_layernorm; Llama's and Qwen2's is post_attention_layernorm.
    norms = {"input_layernorm": "attn_norm"}
    if c.sandwich_norm:
        norms.update(post_attention_layernorm="attn_post_norm", pre_feedforward_layernorm="mlp_norm",
                     post_feedforward_layernorm="mlp_post_norm")
    else:
        norms["post_attention_layernorm"] = "mlp_norm"
    E = [_Entry("model.embed_tokens.weight", (c.vocab_size, c.d_model), ("embed.weight",))]
    for i in range(c.n_layer):
        h, o = f"model.layers.{i}", f"blocks.{i}"
        E += [_Entry(f"{h}.{hf_norm}.weight", (c.d_model,), (f"{o}.{ours}.weight",)) for hf_norm, ours in norms.items()]
        if c.qk_norm:
            E += [_Entry(f"{h}.self_attn.{n}_norm.weight", (c.head_dim,), (f"{o}.attn.{n}_norm.weight",)) for n in "qk"]
        for name, out_dim, in_dim in (("q", q, c.d_model), ("k", kv, c.d_model), ("v", kv, c.d_model),
                                      ("o", c.d_model, q)):
            E.append(_Entry(f"{h}.self_attn.{name}_proj.weight", (out_dim, in_dim), (f"{o}.attn.{name}_proj.weight",)))
            if name in biased:
                E.append(_Entry(f"{h}.self_attn.{name}_proj.bias", (out_dim,), (f"{o}.attn.{name}_proj.bias",)))
        if c.value_residual and i > 0:  # llmkit's own (config.json's model_type is then "llmkit")
            E.append(_Entry(f"{h}.self_attn.value_mix", (), (f"{o}.attn.value_mix",)))
        if c.n_experts:
            E += _moe_entries(c, h, o)
            continue
        for name, out_dim, in_dim in (("gate", c.d_ff, c.d_model), ("up", c.d_ff, c.d_model),
                                      ("down", c.d_model, c.d_ff)):
            E.append(_Entry(f"{h}.mlp.{name}_proj.weight", (out_dim, in_dim), (f"{o}.mlp.{name}_proj.weight",)))
            if c.bias:
                E.append(_Entry(f"{h}.mlp.{name}_proj.bias", (out_dim,), (f"{o}.mlp.{name}_proj.bias",)))
    E.append(_Entry("model.norm.weight", (c.d_model,), ("norm.weight",)))
    if c.unet_skips:  # llmkit's own, as the value residual's mix
        E.append(_Entry("model.skip_weights", (c.n_layer // 2,), ("skip_weights",)))
    if not c.tie_embeddings and not c.num_labels:
        E.append(_Entry("lm_head.weight", (c.vocab_size, c.d_model), ("lm_head.weight",)))
    return E


def _moe_entries(c: ModelConfig, h: str, o: str) -> list[_Entry]:
    """One layer's router and experts (one tensor per expert and matrix on disk, as transformers saves
    them): mixtral's block_sparse_moe.experts.N.w1/w3/w2, qwen2_moe's mlp.experts.N.gate/up/down_proj
    and its shared expert with the sigmoid gate."""
    mixtral = c.hf_model_type == "mixtral"
    moe = f"{h}.block_sparse_moe" if mixtral else f"{h}.mlp"
    names = {"gate": "w1", "up": "w3", "down": "w2"} if mixtral else {n: f"{n}_proj" for n in ("gate", "up", "down")}
    E = [_Entry(f"{moe}.gate.weight", (c.n_experts, c.d_model), (f"{o}.mlp.router.weight",))]
    shapes = {"gate": (c.d_ff, c.d_model), "up": (c.d_ff, c.d_model), "down": (c.d_model, c.d_ff)}
    for j in range(c.n_experts):
        E += [_Entry(f"{moe}.experts.{j}.{hf}.weight", shapes[name], (f"{o}.mlp.{name}_proj",), "expert", j)
              for name, hf in names.items()]
    if c.shared_expert_d_ff:
        f = c.shared_expert_d_ff
        E += [_Entry(f"{moe}.shared_expert.{n}_proj.weight", shape, (f"{o}.mlp.shared_expert.{n}_proj.weight",))
              for n, shape in (("gate", (f, c.d_model)), ("up", (f, c.d_model)), ("down", (c.d_model, f)))]
        if c.shared_expert_gate:
            E.append(_Entry(f"{moe}.shared_expert_gate.weight", (1, c.d_model), (f"{o}.mlp.shared_expert_gate.weight",)))
    return E


def stack_experts(tensors: dict[str, torch.Tensor], entries: list[_Entry]) -> None:
    """Replace the per-expert tensors `from_hf` read ("name#j") by our stacked (experts, out, in) ones."""
    stacked = {e.ours[0] for e in entries if e.kind == "expert"}
    for name in stacked:
        parts = sorted((k for k in tensors if k.startswith(name + "#")), key=lambda k: int(k.rsplit("#", 1)[1]))
        tensors[name] = torch.stack([tensors.pop(k) for k in parts])


def _encoder_map(c: ModelConfig, family: str) -> list[_Entry]:
    """BertModel / BertForMaskedLM / BertForSequenceClassification: post-norm blocks under `bert.`, the MLM
    head under `cls.predictions`, the pooler and the biased `classifier`. RoFormer: the same under
    `roformer.` without learned positions (q and k rotate instead), its classifier `dense` + `out_proj`."""
    d, b = c.d_model, family
    rotary = family == "roformer"

    def linear(hf: str, ours: str, out_dim: int, in_dim: int, kind: str = "copy") -> list[_Entry]:
        heads = c.n_head if kind == "pairs" else 0
        return [_Entry(f"{hf}.weight", (out_dim, in_dim), (f"{ours}.weight",), kind, heads=heads),
                _Entry(f"{hf}.bias", (out_dim,), (f"{ours}.bias",), kind, heads=heads)]

    def norm(hf: str, ours: str) -> list[_Entry]:
        return [_Entry(f"{hf}.{p}", (d,), (f"{ours}.{p}",)) for p in ("weight", "bias")]

    E = [_Entry(f"{b}.embeddings.word_embeddings.weight", (c.vocab_size, d), ("embed.weight",)),
         _Entry(f"{b}.embeddings.token_type_embeddings.weight", (c.type_vocab_size, d), ("type_embed.weight",)),
         *norm(f"{b}.embeddings.LayerNorm", "embed_norm")]
    if rotary:
        E.append(_Entry(f"{b}.encoder.embed_positions.weight", (c.max_seq_len, c.head_dim), (), "sinusoid"))
    else:
        E.append(_Entry(f"{b}.embeddings.position_embeddings.weight", (c.max_seq_len, d), ("pos_embed.weight",)))
    for i in range(c.n_layer):
        h, o = f"{b}.encoder.layer.{i}", f"blocks.{i}"
        for hf_name, ours in (("query", "q"), ("key", "k"), ("value", "v")):
            kind = "pairs" if rotary and ours != "v" else "copy"
            E += linear(f"{h}.attention.self.{hf_name}", f"{o}.attn.{ours}_proj", d, d, kind)
        E += linear(f"{h}.attention.output.dense", f"{o}.attn.o_proj", d, d)
        E += norm(f"{h}.attention.output.LayerNorm", f"{o}.attn_norm")
        E += linear(f"{h}.intermediate.dense", f"{o}.mlp.up_proj", c.d_ff, d)
        E += linear(f"{h}.output.dense", f"{o}.mlp.down_proj", d, c.d_ff)
        E += norm(f"{h}.output.LayerNorm", f"{o}.mlp_norm")
    if c.pooler:
        E += linear("classifier.dense" if rotary else f"{b}.pooler.dense", "pooler", d, d)
    if c.num_labels:
        return E + linear("classifier.out_proj" if rotary else "classifier", "score", c.num_labels, d)
    if c.mlm_head:
        E += linear("cls.predictions.transform.dense", "mlm_dense", d, d)
        E += norm("cls.predictions.transform.LayerNorm", "mlm_norm")
        E.append(_Entry("cls.predictions.bias", (c.vocab_size,), ("lm_head.bias",)))
    return E


def _halves_order(rows: int, heads: int) -> torch.Tensor:
    """The row order that turns each head's adjacent rotary pairs (0, 1), (2, 3), ... (RoFormer) into
    llmkit's halves (0, d/2), (1, d/2 + 1), ...: the same rotation, so the same attention scores."""
    dim = rows // heads
    within = torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])
    return (torch.arange(heads)[:, None] * dim + within).flatten()


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """RoFormer's stored position table: sin of each pair's angle in the first half, cos in the second."""
    angle = torch.arange(positions, dtype=torch.float64)[:, None] / 10000.0 ** (
        torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


def _score_entries(c: ModelConfig) -> list[_Entry]:
    """The classification / reward head of *ForSequenceClassification (no bias), when there is one."""
    return [_Entry("score.weight", (c.num_labels, c.d_model), ("score.weight",))] if c.num_labels else []


def _canonical_name(name: str, model_type: str) -> str:
    """GPT2Model checkpoints (the hub's `gpt2`) omit GPT2LMHeadModel's `transformer.` prefix, BertModel
    checkpoints (sentence-transformers') the `bert.` one."""
    if model_type == "gpt2" and not name.startswith(("transformer.", "lm_head.", "score.")):
        return "transformer." + name
    if model_type in ENCODER_FAMILIES and not name.startswith((f"{model_type}.", "cls.", "classifier.")):
        return f"{model_type}." + name
    return name


# ---------------------------------------------------------------------------------------------
# safetensors headers, read and checked by hand so a bad file is named precisely

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file, after checking its structure: each entry's dtype, shape
    and byte range, the ranges' lengths against their shapes, and the ranges tiling the data section
    exactly (no overlap, no gap), so a damaged header or a truncated file is named, never read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                raise FormatError(f"{path}: truncated safetensors file ({size} bytes; even the 8-byte "
                                  "header length is missing)")
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                raise FormatError(f"{path}: truncated safetensors file: header says {n} bytes of "
                                  f"metadata but the file has only {size - 8} after the length")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}); expected an object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and _int_list(info.get("shape"))
                and _int_list(info.get("data_offsets")) and len(info["data_offsets"]) == 2):
            raise FormatError(f"{path}: corrupt safetensors header: tensor {name!r} is {str(info)[:100]}; expected "
                              "{'dtype': str, 'shape': [int, ...], 'data_offsets': [start, end]}")
        if info["dtype"] not in _ST_DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which llmkit does not read")
        start, end = info["data_offsets"]
        if end > data_size:
            raise FormatError(f"{path}: tensor {name!r} needs bytes {start}..{end} of the data section but "
                              f"the file holds only {data_size}: the file is truncated")
        nbytes = math.prod(info["shape"]) * _ST_DTYPES[info["dtype"]].itemsize
        if end - start != nbytes:
            raise FormatError(f"{path}: corrupt safetensors header: tensor {name!r} of shape {info['shape']} and "
                              f"dtype {info['dtype']} needs {nbytes} bytes, its range {start}..{end} holds {end - start}")
    position = 0
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        if info["data_offsets"][0] != position:
            raise FormatError(f"{path}: corrupt safetensors header: tensor {name!r} starts at byte "
                              f"{info['data_offsets'][0]} of the data section, expected {position} (the tensors' "
                              "ranges must follow each other without gap or overlap)")
        position = info["data_offsets"][1]
    if position != data_size:
        raise FormatError(f"{path}: the tensors end at byte {position} of the data section but it holds {data_size}")
    return header


def _int_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def read_safetensors(path: Path, expected: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, after `read_safetensors_header`; each must be floating point
    (a damaged dtype such as F32 -> I32 keeps the byte count). Problems are FormatErrors naming the file;
    `expected` says what it should hold (an adapter's weights, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} is missing; expected {expected}")
    header = read_safetensors_header(path)
    for name, info in header.items():
        if info["dtype"] not in _FLOAT_DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has dtype {info['dtype']}; expected {expected} in floating "
                              f"point ({', '.join(_FLOAT_DTYPES)})")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in header}
    except Exception as e:  # safetensors raises its own error types
        raise FormatError(f"{path}: cannot read tensors ({e})") from None


# ---------------------------------------------------------------------------------------------
# Loading


def read_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a folder; expected a Hugging Face checkpoint folder with "
                          f"{CONFIG} and {WEIGHTS}")
    if not path.is_file():
        raise FormatError(f"{folder}: no {CONFIG}; expected a Hugging Face checkpoint folder with "
                          f"{CONFIG} and {WEIGHTS}")
    hf_config = read_json(path, "a Hugging Face config.json (a JSON object)")
    if not isinstance(hf_config, dict):
        raise FormatError(f"{path}: holds a JSON {type(hf_config).__name__}; expected a JSON object")
    try:
        return ModelConfig.from_hf_config(hf_config, source=str(path))
    except ConfigError as e:  # (the dataclass's own checks do not know the file)
        raise FormatError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def _weight_files(folder: Path) -> dict[str, Path]:
    """Map each stored tensor name to its file: one model.safetensors, or a sharded index."""
    index = folder / INDEX
    if index.is_file():
        weight_map = read_json(index, "a safetensors index {'weight_map': {tensor: file}}")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
            raise FormatError(f"{index}: not a valid safetensors index; expected {{'weight_map': {{tensor: file}}}}")
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / WEIGHTS
    if single.is_file():
        return {name: single for name in read_safetensors_header(single)}
    if (folder / "pytorch_model.bin").exists():
        raise FormatError(f"{folder}: only pickled pytorch_model.bin weights; llmkit reads safetensors "
                          "only (weights are never unpickled). Convert with transformers' save_pretrained.")
    raise FormatError(f"{folder}: no {WEIGHTS} or {INDEX}")


def load_checkpoint(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint folder into a config and llmkit-named tensors (in their stored dtype)."""
    folder = Path(folder)
    config = read_config(folder)
    model_type = config.hf_model_type
    stored = _weight_files(folder)

    headers: dict[Path, dict[str, dict]] = {}
    for file in sorted(set(stored.values())):
        if not file.is_file():
            raise FormatError(f"{file}: listed in {INDEX} but missing")
        headers[file] = read_safetensors_header(file)
    located: dict[str, tuple[Path, str]] = {}  # canonical name -> (file, name in file)
    for file, header in headers.items():
        for name in header:
            if not name.endswith(_IGNORED_SUFFIXES):
                located[_canonical_name(name, model_type)] = (file, name)

    entries = tensor_map(config)
    expected = {e.hf for e in entries}
    if model_type == "gpt2":
        located.pop("lm_head.weight", None)  # GPT-2's head is the token embedding
    if model_type in ENCODER_FAMILIES and config.mlm_head and not config.num_labels:
        for name in _BERT_TIED:
            located.pop(name, None)
    unexpected = sorted(set(located) - expected)
    if unexpected:
        file = located[unexpected[0]][0]
        raise FormatError(f"{file}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                          f"for model_type {model_type!r} with this config.json; refusing a partial load")
    for e in entries:
        if e.hf not in located:
            where = folder / (INDEX if (folder / INDEX).is_file() else WEIGHTS)
            raise FormatError(f"{where}: tensor {e.hf!r} is missing (model_type {model_type!r}, "
                              f"n_layer={config.n_layer})")
        file, name = located[e.hf]
        shape = tuple(headers[file][name]["shape"])
        if shape != e.shape:
            raise FormatError(f"{file}: tensor {e.hf!r} has shape {list(shape)}, expected {list(e.shape)} "
                              f"from {CONFIG}")
        if headers[file][name]["dtype"] not in _FLOAT_DTYPES:
            raise FormatError(f"{file}: tensor {e.hf!r} has dtype {headers[file][name]['dtype']}; expected weights "
                              f"in floating point ({', '.join(_FLOAT_DTYPES)})")

    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[_Entry]] = {}
    for e in entries:
        by_file.setdefault(located[e.hf][0], []).append(e)
    for file, file_entries in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                for e in file_entries:
                    tensors.update(from_hf(e, f.get_tensor(located[e.hf][1])))
        except Exception as e:  # safetensors raises its own error types
            raise FormatError(f"{file}: cannot read tensors ({e})") from None
    stack_experts(tensors, entries)
    if config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    return config, tensors


def from_hf(e: _Entry, t: torch.Tensor) -> dict[str, torch.Tensor]:
    if e.kind == "copy":
        return {e.ours[0]: t}
    if e.kind == "pairs":
        return {e.ours[0]: t[_halves_order(len(t), e.heads)].contiguous()}
    if e.kind == "sinusoid":
        # sin/cos of the same angles, transformers' in numpy, ours in torch: equal to float32 rounding
        # (1e-5 leaves room for it), compared in the file's dtype (a bf16 checkpoint stores bf16 values).
        if not torch.allclose(t.float(), sinusoid_table(*e.shape).to(t.dtype).float(), atol=1e-5):
            raise FormatError(f"{e.hf}: not RoFormer's sinusoidal position table; llmkit computes the rotary "
                              "angles from the formula and refuses a file whose table differs")
        return {}
    if e.kind == "transpose":
        return {e.ours[0]: t.t().contiguous()}
    if e.kind == "expert":
        return {f"{e.ours[0]}#{e.expert}": t}
    parts = (t.t() if t.dim() == 2 else t).chunk(3, dim=0)  # qkv
    return {name: p.contiguous() for name, p in zip(e.ours, parts, strict=True)}


def to_hf(e: _Entry, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    if e.kind == "copy":
        return sd[e.ours[0]]
    if e.kind == "pairs":
        t = sd[e.ours[0]]
        return t[torch.argsort(_halves_order(len(t), e.heads))]
    if e.kind == "sinusoid":
        return sinusoid_table(*e.shape)
    if e.kind == "transpose":
        return sd[e.ours[0]].t()
    if e.kind == "expert":
        return sd[e.ours[0]][e.expert]
    fused = torch.cat([sd[n] for n in e.ours], dim=0)
    return fused.t() if fused.dim() == 2 else fused


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(folder: Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                    dtype: torch.dtype | None = None, max_shard_size: int | None = None) -> Path:
    """Write config.json, generation_config.json and safetensors weights (sharded if asked), each
    file atomically; config.json goes last so a folder with a config has complete weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = tensor_map(config)
    covered = {name for e in entries for name in e.ours} | ({"lm_head.weight"} if config.tie_embeddings else set())
    if dropped := sorted(set(state_dict) - covered):  # a weight the format has no place for is an error, not lost
        raise FormatError(f"saving {len(dropped)} tensor(s) the {config.hf_model_type} layout has no place for: "
                          f"{dropped[:5]}; refusing to write a checkpoint without them")
    tensors: dict[str, torch.Tensor] = {}
    for e in entries:
        t = to_hf(e, state_dict).detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[e.hf] = t.to("cpu").contiguous().clone()  # own storage: safetensors refuses shared memory
    stored_dtype = dtype or state_dict["embed.weight"].dtype

    shards = _shard(tensors, max_shard_size)
    written = set()
    if len(shards) == 1:
        save_safetensors(shards[0], folder / WEIGHTS)
        written.add(WEIGHTS)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, folder / name)
            weight_map.update(dict.fromkeys(shard, name))
            written.add(name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_json(folder / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.add(INDEX)
    for stale in list(folder.glob("model*.safetensors")) + list(folder.glob(INDEX)):
        if stale.name not in written:
            stale.unlink()

    generation = {k: v for k, v in (("bos_token_id", config.bos_token_id), ("eos_token_id", config.eos_token_id),
                                    ("pad_token_id", config.pad_token_id)) if v is not None}
    atomic_write_json(folder / GENERATION_CONFIG, generation)
    hf_config = config.to_hf_config()
    hf_config["torch_dtype"] = hf_config["dtype"] = str(stored_dtype).removeprefix("torch.")
    atomic_write_json(folder / CONFIG, hf_config)
    return folder


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        except SafetensorError as e:  # its only cause for contiguous, unshared tensors: the write failed
            raise StorageError(f"cannot write {path}: {e}") from None


def _shard(tensors: dict[str, torch.Tensor], max_shard_size: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_shard_size:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards
