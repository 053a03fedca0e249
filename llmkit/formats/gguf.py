"""GGUF files (llama.cpp's format) in and out: file <-> (ModelConfig, llmkit-named tensors, Tokenizer).

Three architectures: `llama` (also Mixtral: `llama.expert_count` experts, the router as
`ffn_gate_inp`, the experts stacked 3-D as `ffn_{gate,up,down}_exps`), `qwen2` (llama + q/k/v
biases), `qwen2moe` (qwen2 with those experts, unrenormalised top-k, and a sigmoid-gated shared
expert `ffn_*_shexp`) and `gemma3` (q/k norms, sandwich norms, scaled embeddings, sliding-window layers). Reading parses with the `gguf` package (llama.cpp's
own reader), dequantizes every tensor to float32 with the package's dequantizers (so our weights
are bit-identical to what transformers' `gguf_file=` loader produces) and undoes what llama.cpp's
converter changed: for `llama` only, the row permutation of the Q and K projections (its llama RoPE
pairs adjacent dimensions; ours and transformers' pair i with i + head_dim/2, as llama.cpp's NEOX
RoPE of qwen2 and gemma3 does, so those are stored unpermuted); for `gemma3`, the +1 added to every
norm weight (HF stores w with gain 1 + w). The tokenizer and chat template come from the metadata.
Writing does the reverse, quantizing each tensor to the type llama.cpp's quantizer would choose for
the requested file type (`gguf_quants.plan_types`). Like hf.py, this module never imports the model.
"""

from __future__ import annotations

import functools
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, FormatError
from llmkit.files import atomic_path
from llmkit.formats.gguf_tokenizer import tokenizer_from_metadata, tokenizer_to_metadata
from llmkit.tokenizer import Tokenizer

ARCHITECTURES = ("llama", "qwen2", "gemma3", "qwen2moe")
_HF_TO_ARCH = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "mixtral": "llama", "qwen2_moe": "qwen2moe"}

# llama.cpp's gemma3: every 6th layer is global unless `sliding_window_pattern` says otherwise
# (src/models/gemma3.cpp: load_swa_pattern(ml, 6)); sliding layers use RoPE base 10,000 unless
# `rope.freq_base_swa` is set (llama-hparams.h: rope_freq_base_train_swa = 10000.0f).
GEMMA3_SWA_PATTERN = 6
GEMMA3_LOCAL_THETA = 10000.0

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
    tokenizer: Tokenizer | None  # None when read with with_tokenizer=False
    metadata: dict = field(repr=False)  # every key except the tokenizer's big arrays
    tensor_types: dict[str, str] = field(repr=False)  # GGUF tensor name -> its stored type


# ---------------------------------------------------------------------------------------------
# Names: llama.cpp's tensor names <-> llmkit's


def gguf_arch(config: ModelConfig) -> str:
    """The llama.cpp architecture that computes `config` (llama, qwen2 or gemma3)."""
    config.check_exportable("GGUF")
    model_type = config.hf_model_type
    if model_type not in _HF_TO_ARCH:
        raise ConfigError(f"only llama-style models (llama, qwen2, gemma3: rope, rmsnorm, gated MLP) can be written "
                          f"to GGUF; this config is {model_type}")
    return _HF_TO_ARCH[model_type]


def _names(config: ModelConfig) -> dict[str, str]:
    """GGUF name -> llmkit name for a llama, qwen2 or gemma3 model."""
    c = config
    names = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight"}
    if not c.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    linears = {"attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    biased = set(linears) if c.bias else {"attn_q", "attn_k", "attn_v"} if c.qkv_bias else set()
    norms = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm"}
    if c.qk_norm:
        norms.update(attn_q_norm="attn.q_norm", attn_k_norm="attn.k_norm")
    if c.sandwich_norm:
        norms.update(post_attention_norm="attn_post_norm", post_ffw_norm="mlp_post_norm")
    if c.n_experts:  # the router and the experts' stacked (experts, out, in) matrices
        for g in ("ffn_gate", "ffn_up", "ffn_down"):
            del linears[g]
        linears["ffn_gate_inp"] = "mlp.router"
    if c.shared_expert_d_ff:  # Qwen2-MoE's shared expert and its gate
        linears.update(ffn_gate_shexp="mlp.shared_expert.gate_proj", ffn_up_shexp="mlp.shared_expert.up_proj",
                       ffn_down_shexp="mlp.shared_expert.down_proj")
        if c.shared_expert_gate:
            linears["ffn_gate_inp_shexp"] = "mlp.shared_expert_gate"
    for i in range(c.n_layer):
        for g, o in {**norms, **linears}.items():
            names[f"blk.{i}.{g}.weight"] = f"blocks.{i}.{o}.weight"
            if g in biased:
                names[f"blk.{i}.{g}.bias"] = f"blocks.{i}.{o}.bias"
        if c.n_experts:
            names.update({f"blk.{i}.ffn_{p}_exps.weight": f"blocks.{i}.mlp.{p}_proj" for p in ("gate", "up", "down")})
    return names


def gguf_names(config: ModelConfig) -> dict[str, str]:
    """GGUF tensor name -> llmkit state-dict name (the importance matrix keys its vectors by the former)."""
    return _names(config)


def _norm_shift(arch: str, gguf_name: str) -> float:
    """What llama.cpp's converter adds to a stored weight: 1 to every gemma3 norm (gain 1 + w)."""
    return 1.0 if arch == "gemma3" and gguf_name.endswith("norm.weight") else 0.0


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
    """The file's checked `GGUFReader` (memory-mapped). The last one is kept while the file's size and
    modification time stay the same: parsing SmolLM2's header (49,152 tokens and their merges) takes
    ~2 s, and loading a model, then packing its int4 groups, would parse it twice."""
    if not path.is_file():
        raise FormatError(f"{path}: no such GGUF file")
    stat = path.stat()
    return _open_checked(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _open_checked(path: Path, size: int, mtime_ns: int):
    gguf = _gguf()
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:  # what a damaged file raises
        raise FormatError(f"{path}: unreadable GGUF header ({type(e).__name__}: {str(e)[:200]}); "
                          f"the file ({size} bytes) is truncated or corrupt") from None
    # llama.cpp's rule (gguf.cpp): the tensors' data follow each other in table order, each padded to the
    # alignment. A damaged offset, type or dimension would otherwise read another tensor's bytes.
    expected, align = int(reader.data_offset), int(reader.alignment)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise FormatError(f"{path}: tensor {t.name!r} needs bytes {t.data_offset}..{end} but the file has "
                              f"only {size}: the file is truncated")
        if int(t.data_offset) != expected:
            raise FormatError(f"{path}: tensor {t.name!r} starts at byte {t.data_offset}, expected {expected} (where "
                              f"the previous tensor ends, padded to {align} bytes): the tensor table is corrupt")
        expected += -(-int(t.n_bytes) // align) * align
    if reader.tensors and not 0 <= size - end < align:
        raise FormatError(f"{path}: the tensors end at byte {end} but the file has {size} bytes: the tensor table "
                          "is corrupt")
    return reader


def _metadata(reader, source: str) -> dict:
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = f.contents()
        except Exception as e:
            raise FormatError(f"{source}: metadata key {key!r} cannot be decoded ({e})") from None
    return meta


# GGUF value types (gguf.GGUFValueType) -> struct / numpy format; 8 is a string, 9 an array.
_SCALAR_TYPES = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_metadata(path: str | os.PathLike) -> dict:
    """A GGUF file's key/values (as `_metadata` gives them), parsed straight from the header bytes.

    `gguf.GGUFReader` builds numpy views for every item of every array: 20-30 s for Gemma-3's
    262k-token vocabulary on 2 cores; this reads the same keys in about a second and no tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such GGUF file")
    if (size := path.stat().st_size) < 24:  # (mmap refuses an empty file)
        raise FormatError(f"{path}: truncated GGUF file ({size} bytes; the 24-byte header is missing)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            magic, version, _, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
            if magic != b"GGUF" or version not in (2, 3):
                raise FormatError(f"{path}: not a GGUF v2/v3 file (starts with {magic!r}, version {version})")
            meta, pos = {}, 24
            for _ in range(n_kv):
                key, pos = _gguf_string(buf, pos)
                (kind,), pos = struct.unpack_from("<I", buf, pos), pos + 4
                meta[key], pos = _gguf_value(buf, pos, kind)
        except (struct.error, ValueError, KeyError, UnicodeDecodeError) as e:
            if isinstance(e, FormatError):
                raise
            raise FormatError(f"{path}: unreadable GGUF header ({type(e).__name__}: {str(e)[:200]}); the file is "
                              "truncated or corrupt") from None
    return meta


def _gguf_string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + n
    if end > len(buf):
        raise ValueError(f"a string of {n} bytes at offset {pos} runs past the end")
    return buf[pos + 8:end].decode("utf-8"), end


def _gguf_value(buf, pos: int, kind: int):
    if kind == 8:
        return _gguf_string(buf, pos)
    if kind != 9:
        fmt = _SCALAR_TYPES[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    item, n = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item in _SCALAR_TYPES:  # numbers: one numpy read
        dtype = np.dtype(_SCALAR_TYPES[item].replace("?", "b1"))
        return np.frombuffer(buf, dtype, n, pos).tolist(), pos + n * dtype.itemsize
    values = []
    for _ in range(n):
        value, pos = _gguf_value(buf, pos, item)
        values.append(value)
    return values, pos


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
    fields = dict(
        name=str(meta.get("general.name", "gguf")), vocab_size=int(vocab),
        n_layer=int(_require(meta, a + "block_count", source)), n_head=n_head,
        n_kv_head=int(meta.get(a + "attention.head_count_kv") or n_head), d_model=d_model,
        head_dim=int(head_dim), d_ff=int(_require(meta, a + "feed_forward_length", source)),
        pos_embedding="rope", **rope_fields,  # rope_theta, rope_scaling, max_seq_len
        norm="rmsnorm", norm_eps=_f32(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
        activation="silu", gated_mlp=True, tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    if arch == "llama":
        fields["bias"] = "blk.0.attn_q.bias" in tensor_names
        if meta.get(a + "expert_count"):  # Mixtral
            fields.update(n_experts=int(meta[a + "expert_count"]),
                          experts_per_token=int(_require(meta, a + "expert_used_count", source)))
    elif arch in ("qwen2", "qwen2moe"):
        fields["qkv_bias"] = True
        if arch == "qwen2moe":  # llama.cpp's qwen2moe: softmax top-k without renormalisation, a gated shared expert
            fields.update(n_experts=int(_require(meta, a + "expert_count", source)),
                          experts_per_token=int(_require(meta, a + "expert_used_count", source)),
                          d_ff=int(_require(meta, a + "expert_feed_forward_length", source)),
                          shared_expert_d_ff=int(_require(meta, a + "expert_shared_feed_forward_length", source)),
                          moe_renormalize=False)
    else:
        fields.update(_gemma3_fields(meta, fields, source))
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise FormatError(f"{source}: the metadata describes an invalid model ({e})") from None


def _gemma3_fields(meta: dict, fields: dict, source: str) -> dict:
    """What llama.cpp's gemma3 graph computes beyond llama (src/models/gemma3.cpp)."""
    for key in ("gemma3.final_logit_softcapping", "gemma3.attn_logit_softcapping"):
        if meta.get(key):
            raise FormatError(f"{source}: {key}={meta[key]} is not supported (llmkit's Gemma-3 has no soft-capping)")
    n_layer, window = fields["n_layer"], int(meta.get("gemma3.attention.sliding_window") or 0)
    pattern = meta.get("gemma3.attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
    if isinstance(pattern, list):  # one flag per layer: is it sliding?
        if len(pattern) != n_layer:
            raise FormatError(f"{source}: gemma3.attention.sliding_window_pattern lists {len(pattern)} layers, "
                              f"expected {n_layer}")
        sliding = [bool(p) for p in pattern]
    else:  # llama_hparams::set_swa_pattern: layer il is sliding when il % n < n - 1 (n = 0: all sliding)
        n = int(pattern)
        sliding = [n == 0 or il % n < n - 1 for il in range(n_layer)]
    types = ["sliding_attention" if s else "full_attention" for s in sliding] if window else None
    if types is not None and len(set(types)) == 1:  # uniform: llmkit says it with sliding_window alone
        types, window = None, window if sliding[0] else 0
    # llama.cpp scales queries by 1/sqrt(head_dim), except Gemma-3 27B (62 layers): 1/sqrt(d_model / n_head).
    scalar = fields["d_model"] // fields["n_head"] if n_layer == 62 else fields["head_dim"]
    return dict(activation="gelu_tanh", norm_offset=1.0, qk_norm=True, sandwich_norm=True, embed_scale=True,
                attn_scale=float(scalar) ** -0.5, sliding_window=window or None, layer_types=types,
                rope_local_theta=_f32(meta.get("gemma3.rope.freq_base_swa", GEMMA3_LOCAL_THETA)))


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


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
          "rope_theta": _f32(meta.get(a + "rope.freq_base", 10000.0))}
    if kind != "none":
        scaling = {"rope_type": kind, "factor": _f32(_require(meta, a + "rope.scaling.factor", source))}
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


INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # 4-bit levels on groups of 32 with a scale and an offset each


def int4_groups(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """A Q4_0, Q4_1 or Q4_K tensor's own 4-bit levels on groups of 32 inputs, in the form of llmkit's
    int4 kernel, w = (q - 8) * scale + zero: (q uint8, scale, zero float32 per group), read from the
    blocks without a round trip through float. Q4_0 is d * (q - 8); Q4_1 is d * q + m, so
    zero = m + 8d; Q4_K's sub-blocks of 32 are d * sc * q - dmin * mn (6-bit sc, mn unpacked by the
    gguf package's `Q4_K.get_scale_min`)."""
    gguf = _gguf()
    rows, cols = shape
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1])
    head = {"Q4_0": 2, "Q4_1": 4, "Q4_K": 16}[type_name]
    nibbles = raw[:, head:].reshape(raw.shape[0], -1, 1, 16 if type_name != "Q4_K" else 32)
    q = ((nibbles >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(rows, cols)
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)  # (blocks, 1)
    if type_name == "Q4_0":
        scale, zero = d, np.zeros_like(d)
    elif type_name == "Q4_1":
        scale, zero = d, raw[:, 2:4].copy().view(np.float16).astype(np.float32) + 8 * d
    else:
        dmin = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = gguf.quants.Q4_K.get_scale_min(raw[:, 4:16])
        scale = d * sc.astype(np.float32)
        zero = 8 * scale - dmin * mn.astype(np.float32)
    return q, scale.reshape(rows, cols // 32), zero.reshape(rows, cols // 32)


def read_int4_groups(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The blocks' linear weights that a GGUF file stores as Q4_0, Q4_1 or Q4_K, as `int4_groups`
    (q, scale, zero) under llmkit's layer names (`blocks.0.attn.q_proj`), rows in llmkit's order:
    `llmkit.quant.quantize(..., groups=)` packs them as they are instead of re-quantizing."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader, str(path))
    config = config_from_metadata(meta, {t.name for t in reader.tensors}, str(path))
    arch, names, shapes = meta["general.architecture"], _names(config), _expected_shapes(config)
    groups = {}
    for t in reader.tensors:
        ours = names.get(t.name, "")
        if t.tensor_type.name not in INT4_TYPES or not ours.startswith("blocks.") or len(shapes[ours]) != 2:
            continue
        parts = int4_groups(t.data, t.tensor_type.name, shapes[ours])
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.n_head if t.name.endswith("attn_q.weight") else config.n_kv_head
            parts = tuple(unpermute_qk(a, heads) for a in parts)
        groups[ours.removesuffix(".weight")] = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in parts)
    return groups


def read_config(path: str | os.PathLike) -> ModelConfig:
    """A GGUF file's ModelConfig from its metadata and tensor names, reading no tensor data."""
    reader = _open(Path(path))
    return config_from_metadata(_metadata(reader, str(path)), {t.name for t in reader.tensors}, str(path))


def read_gguf(path: str | os.PathLike, with_tokenizer: bool = True, only: set[str] | None = None) -> GGUFContents:
    """Read a GGUF model file: config, float32 tensors with llmkit names, tokenizer, metadata.

    Every check (architecture, names, shapes, types, tokenizer) runs before any tensor is
    dequantized, so a bad file fails fast with one `FormatError` naming the problem.
    `with_tokenizer=False` skips the tokenizer (None); `only` dequantizes just those llmkit names
    (for inspection and tests; every tensor is still checked).
    """
    path = Path(path)
    source = str(path)
    reader = _open(path)
    meta = _metadata(reader, source)
    stored = {t.name: t for t in reader.tensors}
    config = config_from_metadata(meta, set(stored), source)
    arch = meta["general.architecture"]
    tokenizer = None
    if with_tokenizer:
        tokenizer = tokenizer_from_metadata(meta, source)
        if tokenizer.vocab_size != config.vocab_size:
            raise FormatError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                              f"is {config.vocab_size}")

    names = _names(config)
    unknown = sorted(set(stored) - set(names))
    if unknown:
        raise FormatError(f"{source}: unexpected tensor(s) {unknown[:5]} for a {config.n_layer}-layer {arch}; "
                          "refusing a partial load")
    shapes = _expected_shapes(config)
    for g, ours in names.items():
        if g not in stored:
            raise FormatError(f"{source}: tensor {g!r} is missing (architecture {arch}, {config.n_layer} layers)")
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
        if only is not None and ours not in only:
            continue
        t = stored[g]
        w = dequantize(t.data, t.tensor_type.name, shapes[ours], g, source)
        if arch == "llama" and g.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, config.n_head)
        elif arch == "llama" and g.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, config.n_kv_head)
        elif shift := _norm_shift(arch, g):
            w = w - np.float32(shift)
        tensors[ours] = torch.from_numpy(w if w.flags.writeable and w.flags.c_contiguous else np.array(w))
    if config.tie_embeddings and "embed.weight" in tensors:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    small = {k: v for k, v in meta.items() if not k.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                               "tokenizer.ggml.merges", "tokenizer.ggml.scores"))}
    return GGUFContents(config, tensors, tokenizer, small, {g: t.tensor_type.name for g, t in stored.items()})


def read_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Only the tokenizer of a GGUF file (reads the metadata, dequantizes nothing)."""
    return tokenizer_from_metadata(read_metadata(path), str(path))


def packed_bits(path: str | os.PathLike) -> int | None:
    """The packed kernels' bit width (llmkit.quant) that keeps a GGUF file's own precision class, from
    its `general.file_type`: 4 for files of 4 bits or fewer (Q4_1, Q4_K_M, Q3_K, IQ4_NL, ...), 8 for
    5-8 bits (Q5_*, Q6_K, Q8_0), None for float files or a file that does not say. Serving and chat
    run a quantized file quantized by default, as llama.cpp does, instead of on fp32 copies."""
    gguf = _gguf()
    file_type = read_metadata(path).get("general.file_type")
    try:
        name = gguf.LlamaFileType(int(file_type)).name
    except (TypeError, ValueError):
        return None
    digits = re.search(r"Q(\d)", name.removeprefix("MOSTLY_"))
    return None if digits is None else 4 if int(digits.group(1)) <= 4 else 8


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
                       b + "mlp.up_proj.bias": (c.d_ff,), b + "mlp.down_proj.bias": (c.d_model,),
                       b + "attn.q_norm.weight": (c.head_dim,), b + "attn.k_norm.weight": (c.head_dim,),
                       b + "attn_post_norm.weight": (c.d_model,), b + "mlp_post_norm.weight": (c.d_model,),
                       b + "mlp.router.weight": (c.n_experts, c.d_model),
                       b + "mlp.gate_proj": (c.n_experts, c.d_ff, c.d_model),
                       b + "mlp.up_proj": (c.n_experts, c.d_ff, c.d_model),
                       b + "mlp.down_proj": (c.n_experts, c.d_model, c.d_ff),
                       b + "mlp.shared_expert.gate_proj.weight": (c.shared_expert_d_ff, c.d_model),
                       b + "mlp.shared_expert.up_proj.weight": (c.shared_expert_d_ff, c.d_model),
                       b + "mlp.shared_expert.down_proj.weight": (c.d_model, c.shared_expert_d_ff),
                       b + "mlp.shared_expert_gate.weight": (1, c.d_model)})
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
               tokenizer: Tokenizer, quant: str = "F16", name: str | None = None,
               importance: dict[str, np.ndarray] | None = None) -> dict[str, str]:
    """Write a llama, qwen2 or gemma3 GGUF at file type `quant` (see `gguf_quants.FILE_TYPES`), atomically.

    `importance` (GGUF tensor name -> per-input-column weight: an importance matrix, see quant/imatrix.py)
    makes the quantizers minimise the importance-weighted error; a name it has that the model lacks is refused.

    Returns GGUF tensor name -> the type it was stored as (llama.cpp's mixed recipe for K-quants).
    """
    from llmkit.formats import gguf_quants

    gguf = _gguf()
    quant = quant.upper()
    if quant not in gguf_quants.FILE_TYPES:
        raise ConfigError(f"GGUF quantization {quant!r} is not supported; expected one of "
                          f"{', '.join(gguf_quants.FILE_TYPES)}")
    arch = gguf_arch(config)
    _check_expressible(config, arch)
    token_meta = tokenizer_to_metadata(tokenizer)
    if tokenizer.vocab_size != config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                          f"{config.vocab_size}; GGUF needs them equal")

    plan = gguf_quants.plan_types(config, quant)
    unknown = sorted(set(importance or ()) - set(plan))
    if unknown:
        raise ConfigError(f"the importance matrix has tensors this model lacks: {', '.join(unknown[:5])}; "
                          "expected one computed on this model")
    out_types: dict[str, str] = {}
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        _write_metadata(w, config, token_meta, quant, name)
        for g, ours in _names(config).items():
            x = state_dict[ours].detach().to("cpu", torch.float32).numpy()
            if arch == "llama" and g.endswith("attn_q.weight"):
                x = permute_qk(x, config.n_head)
            elif arch == "llama" and g.endswith("attn_k.weight"):
                x = permute_qk(x, config.n_kv_head)
            elif shift := _norm_shift(arch, g):
                x = x + np.float32(shift)
            type_name = plan[g] if g in plan else "F32"  # biases and the extra norms stay F32, as in llama.cpp
            data = gguf_quants.quantize(np.ascontiguousarray(x), type_name, (importance or {}).get(g))
            qtype = gguf.GGMLQuantizationType[type_name]
            w.add_tensor(g, data, raw_dtype=qtype if type_name not in ("F32", "F16") else None)
            out_types[g] = type_name
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out_types


def _check_expressible(c: ModelConfig, arch: str) -> None:
    """Refuse, by name, what llama.cpp's graph for `arch` would compute differently."""
    if c.logit_softcap is not None:
        raise ConfigError(f"GGUF export with logit_softcap={c.logit_softcap} is not supported (llama.cpp's {arch} "
                          "graph does not cap the logits)")
    if arch == "llama" and c.sliding_window is not None:
        raise ConfigError(f"GGUF export of a {c.hf_model_type} model with sliding_window={c.sliding_window} is not "
                          "supported (llama.cpp's llama attends to every position)")
    if arch == "llama" and c.bias:
        raise ConfigError("GGUF export of llama models with biases is not supported (llama.cpp's llama has none)")
    if arch == "qwen2moe" and (c.moe_renormalize or not c.shared_expert_gate):
        raise ConfigError("GGUF export of a qwen2_moe model with moe_renormalize=True or an ungated shared expert is "
                          "not supported (llama.cpp's qwen2moe uses the raw top-k probabilities and a sigmoid gate)")
    if arch in ("qwen2", "qwen2moe") and c.sliding_window is not None:
        raise ConfigError(f"GGUF export of a qwen2 model with sliding_window={c.sliding_window} is not supported "
                          "(llama.cpp's qwen2 attends to every position)")
    if arch in ("qwen2", "qwen2moe") and c.head_dim * c.n_head != c.d_model:
        raise ConfigError(f"GGUF export of a qwen2 model with head_dim={c.head_dim} != d_model/n_head is not "
                          "supported (llama.cpp's qwen2 derives head_dim from d_model)")
    if arch == "gemma3":
        if c.activation != "gelu_tanh":
            raise ConfigError(f"GGUF export of a gemma3 model with activation={c.activation!r} is not supported "
                              "(llama.cpp's gemma3 uses gelu_tanh)")
        scalar = c.d_model // c.n_head if c.n_layer == 62 else c.head_dim
        scale = c.head_dim ** -0.5 if c.attn_scale is None else c.attn_scale
        if abs(scale - scalar ** -0.5) > 1e-9 * scalar ** -0.5:
            raise ConfigError(f"GGUF export of a gemma3 model with attn_scale={scale} is not supported: "
                              f"llama.cpp's gemma3 with {c.n_layer} layers scales queries by {scalar}**-0.5")


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
    if w.arch == "gemma3":
        _write_gemma3_layers(w, c)
    if c.n_experts:
        w.add_expert_count(c.n_experts)
        w.add_expert_used_count(c.experts_per_token)
    if c.shared_expert_d_ff:
        w.add_expert_feed_forward_length(c.d_ff)
        w.add_expert_shared_feed_forward_length(c.shared_expert_d_ff)
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


def _write_gemma3_layers(w, c: ModelConfig) -> None:
    """Sliding window, which layers slide (only when not llama.cpp's default every-6th-global) and their RoPE base."""
    sliding = [c.layer_type(i) == "sliding_attention" for i in range(c.n_layer)]
    if not any(sliding):
        return  # no sliding_window key: llama.cpp's gemma3 makes every layer global
    w.add_sliding_window(c.sliding_window)
    if sliding != [i % GEMMA3_SWA_PATTERN < GEMMA3_SWA_PATTERN - 1 for i in range(c.n_layer)]:
        w.add_sliding_window_pattern(sliding)
    w.add_rope_freq_base_swa(c.rope_theta if c.rope_local_theta is None else c.rope_local_theta)


def export_gguf(spec: str | os.PathLike, out: str | os.PathLike, quant: str = "Q8_0",
                importance: dict[str, np.ndarray] | None = None) -> dict[str, str]:
    """`llmkit export`: a checkpoint folder, GGUF file or registry name -> a GGUF file at `quant`."""
    from llmkit.formats import named

    config, tensors, tokenizer = named.read(spec)
    return write_gguf(out, config, tensors, tokenizer, quant=quant, importance=importance)
