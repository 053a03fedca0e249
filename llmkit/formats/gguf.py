"""GGUF files (llama.cpp's format) in and out: file <-> (ModelConfig, llmkit-named tensors, Tokenizer).

Reading parses with the `gguf` package (llama.cpp's own reader), dequantizes every tensor to
float32 with the package's dequantizers (so our weights are bit-identical to what transformers'
`gguf_file=` loader produces), undoes the row permutation llama.cpp's converter applies to the
Q and K projections (its RoPE pairs adjacent dimensions; ours and transformers' pair i with
i + head_dim/2), and rebuilds the tokenizer and chat template from the metadata. Writing does the
reverse, quantizing each tensor to the type llama.cpp's quantizer would choose for the requested
file type (`gguf_quants.RECIPES`). Like hf.py, this module never imports the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, FormatError
from llmkit.files import atomic_path
from llmkit.formats.gguf_tokenizer import tokenizer_from_metadata, tokenizer_to_metadata
from llmkit.tokenizer import Tokenizer

ARCHITECTURES = ("llama",)

# Tensor types we dequantize: llama.cpp's common file types (SmolLM2: Q4_1, Q8_0, F32;
# Gemma-3 Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0; our K-quant exports also use Q3_K, Q5_K, IQ4_NL).
READ_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
              "Q6_K", "IQ4_NL")


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a dependency
        raise FormatError("reading or writing GGUF needs the `gguf` package: pip install gguf") from None
    return gguf


@dataclass
class GGUFContents:
    """What a GGUF file holds, in llmkit's terms."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    metadata: dict = field(repr=False)  # every key except the tokenizer's big arrays
    tensor_types: dict[str, str] = field(repr=False)  # GGUF tensor name -> its stored type


# ---------------------------------------------------------------------------------------------
# Names: llama.cpp's tensor names <-> llmkit's


def _names(config: ModelConfig) -> dict[str, str]:
    """GGUF name -> llmkit name for a llama-architecture model."""
    names = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight"}
    if not config.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    parts = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
             "attn_output": "attn.o_proj", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(config.n_layer):
        for ours_suffix in ("weight",) + (("bias",) if config.bias else ()):
            for g, o in parts.items():
                if ours_suffix == "bias" and g.endswith("norm"):
                    continue
                names[f"blk.{i}.{g}.{ours_suffix}"] = f"blocks.{i}.{o}.{ours_suffix}"
    return names


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter layout: within each head, rows (i, i + d/2) become adjacent (2i, 2i+1)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo `permute_qk`: back to the rotate-half layout of transformers and llmkit."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Reading


def _open(path: Path):
    gguf = _gguf()
    if not path.is_file():
        raise FormatError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:  # what a damaged file raises
        raise FormatError(f"{path}: unreadable GGUF header ({type(e).__name__}: {str(e)[:200]}); "
                          f"the file ({size} bytes) is truncated or corrupt") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise FormatError(f"{path}: tensor {t.name!r} needs bytes {t.data_offset}..{end} but the file has "
                              f"only {size}: the file is truncated")
    return reader


def _metadata(reader) -> dict:
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = f.contents()
        except Exception as e:
            raise FormatError(f"metadata key {key!r} cannot be decoded ({e})") from None
    return meta


def _require(meta: dict, key: str, source: str):
    if key not in meta:
        raise FormatError(f"{source}: metadata key {key!r} is missing; expected it in a "
                          f"{meta.get('general.architecture')} GGUF")
    return meta[key]


def config_from_metadata(meta: dict, tensor_names: set[str], source: str) -> ModelConfig:
    """Map `general.architecture` + `<arch>.*` keys to a ModelConfig."""
    arch = meta.get("general.architecture")
    if arch is None:
        raise FormatError(f"{source}: metadata key 'general.architecture' is missing")
    if arch not in ARCHITECTURES:
        raise FormatError(f"{source}: unsupported architecture {arch!r}; llmkit reads {', '.join(ARCHITECTURES)}")
    a = f"{arch}."
    n_head = int(_require(meta, a + "attention.head_count", source))
    d_model = int(_require(meta, a + "embedding_length", source))
    head_dim = meta.get(a + "attention.key_length") or meta.get(a + "rope.dimension_count") or d_model // n_head
    rope_fields = _rope_from_metadata(meta, a, tensor_names, source)
    vocab = meta.get(a + "vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ()) or None
    if vocab is None:
        raise FormatError(f"{source}: neither {a}vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    try:
        return ModelConfig(
            name=str(meta.get("general.name", "gguf")), vocab_size=int(vocab),
            n_layer=int(_require(meta, a + "block_count", source)), n_head=n_head,
            n_kv_head=int(meta.get(a + "attention.head_count_kv") or n_head), d_model=d_model,
            head_dim=int(head_dim), d_ff=int(_require(meta, a + "feed_forward_length", source)),
            pos_embedding="rope", **rope_fields,
            norm="rmsnorm", norm_eps=float(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
            activation="silu", gated_mlp=True, bias="blk.0.attn_q.bias" in tensor_names,
            tie_embeddings="output.weight" not in tensor_names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    except ConfigError as e:
        raise FormatError(f"{source}: the metadata describes an invalid model ({e})") from None


# llama.cpp's yarn keys that llmkit reads only at their neutral values: the first four have no
# counterpart in transformers' YaRN, and llama.cpp (0.3.x) ignores the betas in a file (it uses 32 and 1).
_GGUF_YARN_NEUTRAL = {"rope.scaling.attn_factor": (1.0,), "rope.scaling.yarn_attn_factor": (1.0,),
                      "rope.scaling.yarn_log_multiplier": (0.0,), "rope.scaling.yarn_ext_factor": (-1.0, 1.0),
                      "rope.scaling.yarn_beta_fast": (32.0,), "rope.scaling.yarn_beta_slow": (1.0,)}


def _rope_from_metadata(meta: dict, a: str, tensor_names: set[str], source: str) -> dict:
    """rope_theta, rope_scaling and max_seq_len from `<arch>.rope.*` keys (llama.cpp's none, linear, yarn),
    through the same translation as config.json (llmkit.rope.rope_from_hf)."""
    from llmkit.rope import rope_from_hf

    kind = meta.get(a + "rope.scaling.type", "none")
    if kind not in ("none", "linear", "yarn"):
        raise FormatError(f"{source}: {a}rope.scaling.type {kind!r} is not supported; llmkit reads none, linear "
                          "and yarn")
    if "rope_freqs.weight" in tensor_names:
        raise FormatError(f"{source}: tensor 'rope_freqs.weight' (llama.cpp's per-frequency factors, Llama-3.1's "
                          "llama3 scaling) is not supported; load the checkpoint's config.json instead")
    hf = {"max_position_embeddings": int(meta.get(a + "context_length", 2048)),
          "rope_theta": float(meta.get(a + "rope.freq_base", 10000.0))}
    if kind != "none":
        scaling = {"rope_type": kind, "factor": float(_require(meta, a + "rope.scaling.factor", source))}
        if a + "rope.scaling.original_context_length" in meta:
            scaling["original_max_position_embeddings"] = int(meta[a + "rope.scaling.original_context_length"])
        if kind == "yarn":
            for key, neutral in _GGUF_YARN_NEUTRAL.items():
                if float(meta.get(a + key, neutral[0])) not in neutral:
                    raise FormatError(f"{source}: {a}{key} = {meta[a + key]} is not supported (llmkit computes "
                                      f"YaRN as transformers and llama.cpp agree on it; expected {neutral[0]})")
        hf["rope_scaling"] = scaling
    try:
        return rope_from_hf(hf, source)
    except ConfigError as e:
        raise FormatError(str(e)) from None


def _write_rope_scaling(w, c: ModelConfig) -> None:
    """llama.cpp's `<arch>.rope.scaling.*` keys for linear and yarn; the other types have none."""
    scaling = c.rope_scaling
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("linear", "yarn"):
        raise ConfigError(f"GGUF export of rope_scaling {kind!r} is not supported: llama.cpp has keys for linear "
                          "and yarn only (llama3 is a rope_freqs tensor, dynamic NTK does not exist there)")
    unmapped = sorted(set(scaling) & {"attention_factor", "mscale", "mscale_all_dim"})
    unmapped += [k for k, default in (("beta_fast", 32), ("beta_slow", 1), ("truncate", True))
                 if scaling.get(k, default) != default]
    if unmapped:
        raise ConfigError(f"GGUF export of yarn with {unmapped} is not supported: llama.cpp computes YaRN's default "
                          "attention factor, betas 32 and 1 and truncated correction range only")
    gguf = _gguf()
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(scaling["factor"])
    if "original_max_position_embeddings" in scaling:
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...], name: str, source: str) -> np.ndarray:
    """One stored tensor as float32 of `shape` (rows first), via the gguf package's dequantizers."""
    gguf = _gguf()
    if type_name not in READ_TYPES:
        raise FormatError(f"{source}: tensor {name!r} has type {type_name}, which llmkit does not dequantize; "
                          f"expected one of {', '.join(READ_TYPES)}")
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = np.ascontiguousarray(data)
    if type_name in ("F32", "F16"):
        raw = raw.view(np.uint8)
    out = gguf.quants.dequantize(raw, qtype)
    return np.asarray(out, dtype=np.float32).reshape(shape)


def read_gguf(path: str | os.PathLike) -> GGUFContents:
    """Read a GGUF model file: config, float32 tensors with llmkit names, tokenizer, metadata.

    Every check (architecture, names, shapes, types, tokenizer) runs before any tensor is
    dequantized, so a bad file fails fast with one `FormatError` naming the problem.
    """
    path = Path(path)
    source = str(path)
    reader = _open(path)
    meta = _metadata(reader)
    stored = {t.name: t for t in reader.tensors}
    config = config_from_metadata(meta, set(stored), source)
    tokenizer = tokenizer_from_metadata(meta, source)
    if tokenizer.vocab_size != config.vocab_size:
        raise FormatError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                          f"{config.vocab_size}")

    names = _names(config)
    unknown = sorted(set(stored) - set(names))
    if unknown:
        raise FormatError(f"{source}: unexpected tensor(s) {unknown[:5]} for a {config.n_layer}-layer llama; "
                          "refusing a partial load")
    shapes = _expected_shapes(config)
    for g, ours in names.items():
        if g not in stored:
            raise FormatError(f"{source}: tensor {g!r} is missing (architecture llama, {config.n_layer} layers)")
        t = stored[g]
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne0 (the row length) first
        if shape != shapes[ours]:
            raise FormatError(f"{source}: tensor {g!r} has shape {list(shape)}, expected {list(shapes[ours])} "
                              "from the metadata")
        if t.tensor_type.name not in READ_TYPES:
            raise FormatError(f"{source}: tensor {g!r} has type {t.tensor_type.name}, which llmkit does not "
                              f"dequantize; expected one of {', '.join(READ_TYPES)}")

    tensors: dict[str, torch.Tensor] = {}
    for g, ours in names.items():
        t = stored[g]
        w = dequantize(t.data, t.tensor_type.name, shapes[ours], g, source)
        if g.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, config.n_head)
        elif g.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, config.n_kv_head)
        tensors[ours] = torch.from_numpy(w if w.flags.writeable and w.flags.c_contiguous else np.array(w))
    if config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    small = {k: v for k, v in meta.items() if not k.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                               "tokenizer.ggml.merges", "tokenizer.ggml.scores"))}
    return GGUFContents(config, tensors, tokenizer, small, {g: t.tensor_type.name for g, t in stored.items()})


def read_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Only the tokenizer of a GGUF file (reads the metadata, dequantizes nothing)."""
    path = Path(path)
    return tokenizer_from_metadata(_metadata(_open(path)), str(path))


def _expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    shapes = {"embed.weight": (c.vocab_size, c.d_model), "norm.weight": (c.d_model,),
              "lm_head.weight": (c.vocab_size, c.d_model)}
    for i in range(c.n_layer):
        b = f"blocks.{i}."
        shapes.update({b + "attn_norm.weight": (c.d_model,), b + "mlp_norm.weight": (c.d_model,),
                       b + "attn.q_proj.weight": (q, c.d_model), b + "attn.k_proj.weight": (kv, c.d_model),
                       b + "attn.v_proj.weight": (kv, c.d_model), b + "attn.o_proj.weight": (c.d_model, q),
                       b + "mlp.gate_proj.weight": (c.d_ff, c.d_model), b + "mlp.up_proj.weight": (c.d_ff, c.d_model),
                       b + "mlp.down_proj.weight": (c.d_model, c.d_ff),
                       b + "attn.q_proj.bias": (q,), b + "attn.k_proj.bias": (kv,), b + "attn.v_proj.bias": (kv,),
                       b + "attn.o_proj.bias": (c.d_model,), b + "mlp.gate_proj.bias": (c.d_ff,),
                       b + "mlp.up_proj.bias": (c.d_ff,), b + "mlp.down_proj.bias": (c.d_model,)})
    return shapes


def is_gguf(path: str | os.PathLike) -> bool:
    """True for an existing file that starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


# ---------------------------------------------------------------------------------------------
# Writing


def write_gguf(path: str | os.PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor],
               tokenizer: Tokenizer, quant: str = "F16", name: str | None = None) -> dict[str, str]:
    """Write a llama-architecture GGUF at file type `quant` (see `gguf_quants.FILE_TYPES`), atomically.

    Returns GGUF tensor name -> the type it was stored as (llama.cpp's mixed recipe for K-quants).
    """
    from llmkit.formats import gguf_quants

    gguf = _gguf()
    quant = quant.upper()
    if quant not in gguf_quants.FILE_TYPES:
        raise ConfigError(f"GGUF quantization {quant!r} is not supported; expected one of "
                          f"{', '.join(gguf_quants.FILE_TYPES)}")
    if config.hf_model_type != "llama":
        raise ConfigError("only llama-style models (rope, rmsnorm, gated MLP) can be written to GGUF; "
                          f"this config is {config.hf_model_type}")
    if config.bias:
        raise ConfigError("GGUF export of llama models with biases is not supported (llama.cpp's llama has none)")
    token_meta = tokenizer_to_metadata(tokenizer)
    if tokenizer.vocab_size != config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                          f"{config.vocab_size}; GGUF needs them equal")

    plan = gguf_quants.plan_types(config, quant)
    out_types: dict[str, str] = {}
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        _write_metadata(w, config, token_meta, quant, name)
        for g, ours in _names(config).items():
            x = state_dict[ours].detach().to("cpu", torch.float32).numpy()
            if g.endswith("attn_q.weight"):
                x = permute_qk(x, config.n_head)
            elif g.endswith("attn_k.weight"):
                x = permute_qk(x, config.n_kv_head)
            type_name = plan[g]
            data = gguf_quants.quantize(np.ascontiguousarray(x), type_name)
            qtype = gguf.GGMLQuantizationType[type_name]
            w.add_tensor(g, data, raw_dtype=qtype if type_name not in ("F32", "F16") else None)
            out_types[g] = type_name
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out_types


def _write_metadata(w, c: ModelConfig, token_meta: dict, quant: str, name: str | None) -> None:
    from llmkit.formats import gguf_quants

    w.add_name(name or c.name)
    w.add_file_type(gguf_quants.FILE_TYPES[quant])
    w.add_quantization_version(2)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.head_dim)
    if c.head_dim * c.n_head != c.d_model:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    _write_rope_scaling(w, c)
    for key, value in token_meta.items():
        if key == "tokenizer.ggml.token_type":
            w.add_array(key, [int(v) for v in value])
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))


def export_gguf(spec: str | os.PathLike, out: str | os.PathLike, quant: str = "Q8_0") -> dict[str, str]:
    """`llmkit export`: a checkpoint folder, GGUF file or registry name -> a GGUF file at `quant`."""
    from llmkit.formats import named

    config, tensors, tokenizer = named.read(spec)
    return write_gguf(out, config, tensors, tokenizer, quant=quant)
