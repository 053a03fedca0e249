"""GGUF quantization: which type each tensor gets (llama.cpp's recipes) and the quantizers themselves.

The `gguf` package quantizes F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 but not the K-quants, so
Q3_K, Q4_K, Q5_K, Q6_K (and IQ4_NL, llama.cpp's fallback for Q3_K rows that are not a multiple of
256) are written here, vectorized over blocks with numpy. Each `quantize_*` returns the packed
blocks *and* the values it meant them to decode to (computed in float32 in the order ggml's
dequantizer uses), so tests check the packing bit-exactly against the package's dequantizers. The
scale searches follow ggml-quants.c (`make_qkx2_quants`, `make_qx_quants`) in spirit; they are not
byte-identical to llama.cpp's quantizer, which no reader needs.
"""

from __future__ import annotations

import numpy as np

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError

QK_K = 256

# File type -> llama.cpp's `general.file_type` (LlamaFileType).
FILE_TYPES = {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9,
              "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17}
_BASE = {"Q3_K_M": "Q3_K", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}
BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "IQ4_NL": 32, "Q3_K": QK_K, "Q4_K": QK_K,
         "Q5_K": QK_K, "Q6_K": QK_K, "F32": 1, "F16": 1, "BF16": 1}
# llama.cpp's replacement when a row is not a multiple of 256 (llama-quant.cpp, "fallback").
_FALLBACK = {"Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


# ---------------------------------------------------------------------------------------------
# Recipes: llama_tensor_get_type for the file types above, llama architecture


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def plan_types(config: ModelConfig, ftype: str) -> dict[str, str]:
    """GGUF tensor name -> stored type, as llama.cpp's `llama-quantize` picks it for `ftype`."""
    if ftype not in FILE_TYPES:
        raise ConfigError(f"GGUF file type {ftype!r} is not supported; expected one of {', '.join(FILE_TYPES)}")
    c, n = config, config.n_layer
    rows = {"token_embd": c.d_model, "output": c.d_model, "attn_q": c.d_model, "attn_k": c.d_model,
            "attn_v": c.d_model, "attn_output": c.n_head * c.head_dim, "ffn_gate": c.d_model, "ffn_up": c.d_model,
            "ffn_down": c.d_ff, "ffn_gate_exps": c.d_model, "ffn_up_exps": c.d_model, "ffn_down_exps": c.d_ff,
            "ffn_gate_shexp": c.d_model, "ffn_up_shexp": c.d_model, "ffn_down_shexp": c.shared_expert_d_ff}
    names = ["token_embd", "output_norm"] + ([] if c.tie_embeddings else ["output"])
    mlp = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps") if c.n_experts else ("ffn_gate", "ffn_up",
                                                                                               "ffn_down")
    if c.shared_expert_d_ff:
        mlp += ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp") + (("ffn_gate_inp_shexp",) if c.shared_expert_gate
                                                                      else ())
    for i in range(n):
        names += [f"blk.{i}.{p}" for p in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", *mlp)]
    plan = {}
    for base_name in names:
        kind = base_name.split(".")[-1]
        if kind.endswith("norm") or kind.startswith("ffn_gate_inp"):  # llama.cpp never quantizes a router
            plan[base_name + ".weight"] = "F32"
            continue
        if kind.endswith("norm"):
            plan[base_name + ".weight"] = "F32"
            continue
        if ftype in ("F32", "F16", "BF16"):
            plan[base_name + ".weight"] = ftype
            continue
        t = _BASE.get(ftype, ftype)
        layer = int(base_name.split(".")[1]) if base_name.startswith("blk.") else -1
        nx = rows[kind]
        if kind == "output" or (kind == "token_embd" and c.tie_embeddings):
            t = "Q8_0" if nx % QK_K else ("Q6_K" if t != "Q8_0" else t)
        elif kind == "attn_v":
            if ftype == "Q3_K_M":
                t = "Q5_K" if layer < 2 else "Q4_K"
            elif ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, n):
                t = "Q6_K"
        elif kind in ("ffn_down", "ffn_down_exps", "ffn_down_shexp"):
            if ftype == "Q3_K_M":
                t = "Q5_K" if layer < n // 16 else "Q4_K"
            elif ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, n):
                t = "Q6_K"
        elif kind == "attn_output" and ftype == "Q3_K_M":
            t = "Q4_K"
        if nx % BLOCK[t]:
            t = _FALLBACK.get(t, "F16")
            if nx % BLOCK[t]:
                t = "F16"
        plan[base_name + ".weight"] = t
    return plan


# ---------------------------------------------------------------------------------------------
# Quantizers


def quantize(x: np.ndarray, type_name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows -> the GGUF payload of `type_name` (float arrays for F32/F16, uint8 blocks otherwise).

    `importance` (one non-negative weight per column: llama.cpp's imatrix, the mean squared input
    activation of each input channel) makes the scale searches minimise the importance-weighted error
    (ggml's `quant_weights`). The K-quants and IQ4_NL multiply their own per-weight search weights by
    it, so all-ones gives the plain bytes; Q4_0 and Q5_0, plain max-abs rounding otherwise, search their
    scale only when the importance is not uniform (a uniform one says no column matters more). Q8_0,
    Q4_1, Q5_1 and the float types ignore it, as llama.cpp's Q8_0 does.
    """
    import gguf

    x = np.ascontiguousarray(x, dtype=np.float32)
    if importance is not None:
        importance = check_importance(importance, x.shape[-1])
    if type_name in _OURS:
        return _OURS[type_name](x, importance)[0]
    if type_name in _WEIGHTED_ONLY and importance is not None and np.ptp(importance) > 0:
        return _WEIGHTED_ONLY[type_name](x, importance)[0]
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType[type_name])


def check_importance(importance: np.ndarray, columns: int) -> np.ndarray:
    imp = np.asarray(importance, dtype=np.float32)
    if imp.shape != (columns,) or not np.all(np.isfinite(imp)) or (imp < 0).any():
        raise ConfigError(f"importance of shape {imp.shape}; expected {columns} finite non-negative weights, "
                          "one per input column")
    return imp


def _per_weight(importance: np.ndarray | None, shape: tuple[int, ...], size: int) -> np.ndarray | float:
    """The per-column importance laid out as the quantizer's blocks (rows of `size`); 1.0 without one."""
    if importance is None:
        return 1.0
    return np.broadcast_to(importance, shape).reshape(-1, size)


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[-1] % size:
        raise ConfigError(f"rows of {x.shape[-1]} values cannot be split into blocks of {size}")
    return x.reshape(-1, size)


def _f16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 bytes as uint8 (n, 2), the float32 value the reader will see)."""
    h = v.astype(np.float16)
    return h.view(np.uint8).reshape(-1, 2), h.astype(np.float32)


def qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
         signed_min: bool = False):
    """Asymmetric scale/min per row (make_qkx2_quants): returns (scale >= 0, min to subtract), the pair of
    lowest `w`-weighted squared error among min/max and the searched ranges (each trial: levels rounded,
    then the weighted least-squares line through them). The K-quants store the min unsigned, so it is kept
    >= 0 (the grid reaches 0); `signed_min` lets the grid start anywhere (llmkit's int4 zero points)."""
    xmin = x.min(1) if signed_min else np.minimum(x.min(1), 0.0)
    rng = x.max(1) - xmin
    ok = rng > 0
    safe = np.where(ok, rng, 1.0)
    sum_w, sum_x = w.sum(1), (w * x).sum(1)
    best_scale = np.where(ok, rng / nmax, 0.0)
    best_min = xmin
    lvl = np.clip(np.rint((nmax / safe)[:, None] * (x - xmin[:, None])), 0, nmax)
    best_err = (w * (best_scale[:, None] * lvl + xmin[:, None] - x) ** 2).sum(1)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / safe
        lvl = np.clip(np.rint(iscale[:, None] * (x - xmin[:, None])), 0, nmax)
        sum_l, sum_l2, sum_xl = (w * lvl).sum(1), (w * lvl * lvl).sum(1), (w * lvl * x).sum(1)
        det = sum_w * sum_l2 - sum_l * sum_l
        good = ok & (det > 0)
        dsafe = np.where(good, det, 1.0)
        scale = (sum_w * sum_xl - sum_x * sum_l) / dsafe
        mn = (sum_l2 * sum_x - sum_l * sum_xl) / dsafe
        if not signed_min:
            pos = mn > 0
            scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), scale)
            mn = np.where(pos, 0.0, mn)
        err = (w * (scale[:, None] * lvl + mn[:, None] - x) ** 2).sum(1)
        better = good & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, mn, best_min)
    return best_scale.astype(np.float32), (-best_min).astype(np.float32)


def _qx(x: np.ndarray, nmax: int, weights: np.ndarray | None = None, with_levels: bool = False):
    """Symmetric signed scale per row (make_qx_quants; rmse_type 1: weights x^2 unless given); levels in
    [-nmax, nmax)."""
    idx = np.abs(x).argmax(1)
    mx = np.take_along_axis(x, idx[:, None], 1)[:, 0]
    ok = mx != 0
    safe = np.where(ok, mx, 1.0)
    w = x * x if weights is None else weights
    best_lvl = np.zeros(x.shape)
    best_scale = np.zeros(len(x))
    best = np.full(len(x), -np.inf)
    for step in range(-9, 10):
        iscale = -(nmax + 0.1 * step) / safe
        lvl = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        sumlx, suml2 = (w * x * lvl).sum(1), (w * lvl * lvl).sum(1)
        good = ok & (suml2 > 0)
        scale = sumlx / np.where(good, suml2, 1.0)
        score = np.where(good, scale * sumlx, -np.inf)
        better = score > best
        best = np.where(better, score, best)
        best_scale = np.where(better, scale, best_scale)
        if with_levels:
            best_lvl = np.where(better[:, None], lvl, best_lvl)
    return (best_scale.astype(np.float32), best_lvl) if with_levels else best_scale.astype(np.float32)


def _signed_max(v: np.ndarray) -> np.ndarray:
    """Per row, the entry of largest magnitude (with its sign)."""
    return np.take_along_axis(v, np.abs(v).argmax(1)[:, None], 1)[:, 0]


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins -> 12 bytes (ggml's get_scale_min_k4 layout)."""
    out = np.zeros((len(ls), 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _scale_min_k(x: np.ndarray, nmax: int, rmin: float, nstep: int, importance: np.ndarray | float = 1.0):
    """Q4_K/Q5_K: 8 sub-blocks of 32 -> fp16 d, dmin, 6-bit scales/mins, levels and their decoded values."""
    nb = len(x)
    xs = x.reshape(nb, 8, 32)
    av = np.sqrt((xs * xs).mean(2, keepdims=True))
    w = (av + np.abs(xs)).reshape(-1, 32)
    w = w if isinstance(importance, float) else importance.reshape(-1, 32) * w
    scale, mn = qkx2(xs.reshape(-1, 32), w, nmax, rmin, 0.1, nstep)
    scale, mn = scale.reshape(nb, 8), mn.reshape(nb, 8)
    max_scale, max_min = scale.max(1), mn.max(1)
    inv_s = np.where(max_scale > 0, 63 / np.where(max_scale > 0, max_scale, 1), 0)
    inv_m = np.where(max_min > 0, 63 / np.where(max_min > 0, max_min, 1), 0)
    ls = np.clip(np.rint(inv_s[:, None] * scale), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(inv_m[:, None] * mn), 0, 63).astype(np.uint8)
    d_bytes, d = _f16((max_scale / 63).astype(np.float32))
    m_bytes, dmin = _f16((max_min / 63).astype(np.float32))
    dl = d[:, None] * ls.astype(np.float32)  # float32, as the dequantizer computes it
    dm = dmin[:, None] * lm.astype(np.float32)
    safe = np.where(dl > 0, dl, 1.0)[..., None]
    lvl = np.where(dl[..., None] > 0, np.clip(np.rint((xs + dm[..., None]) / safe), 0, nmax), 0).astype(np.uint8)
    decoded = (dl[..., None] * lvl.astype(np.float32) - dm[..., None]).reshape(nb, QK_K)
    return d_bytes, m_bytes, _pack_scales_k4(ls, lm), lvl, decoded


def quantize_q4_k(x: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K (144 bytes per 256): d, dmin, 12 scale bytes, 128 bytes of 4-bit levels."""
    shape = x.shape
    d, m, scales, lvl, decoded = _scale_min_k(_blocks(x, QK_K), 15, -1.0, 20, _per_weight(importance, shape, QK_K))
    qs = (lvl[:, 0::2] | (lvl[:, 1::2] << 4)).reshape(len(lvl), 128)
    return _rows(np.hstack([d, m, scales, qs]), shape), decoded.reshape(shape)


def quantize_q5_k(x: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q5_K (176 bytes per 256): d, dmin, 12 scale bytes, 32 bytes of high bits, 128 of low nibbles."""
    shape = x.shape
    d, m, scales, lvl, decoded = _scale_min_k(_blocks(x, QK_K), 31, -0.5, 15, _per_weight(importance, shape, QK_K))
    low = lvl & 0xF
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(len(lvl), 128)
    qh = np.zeros((len(lvl), 32), dtype=np.uint8)
    for j in range(8):
        qh |= (lvl[:, j] >> 4) << j
    return _rows(np.hstack([d, m, scales, qh, qs]), shape), decoded.reshape(shape)


def _sixteen_scales(b: np.ndarray, nmax: int, scale_range: int, importance: np.ndarray | float = 1.0):
    """Q6_K's and Q3_K's scales: each 256-block as 16 sub-blocks of 16, each sub-block's best scale for
    levels in [-nmax, nmax) (make_qx_quants), and the block's d that stores those scales as signed
    integers in [-scale_range, scale_range). Returns (sub-blocks, scales, 1/d, d as f16 bytes, d)."""
    nb = len(b)
    xs = b.reshape(nb, 16, 16)
    x16 = xs.reshape(-1, 16)
    scale = _qx(x16, nmax, None if isinstance(importance, float) else importance.reshape(-1, 16) * (x16 * x16))
    scale = scale.reshape(nb, 16)
    top = _signed_max(scale)
    ok = top != 0
    iscale = np.where(ok, -scale_range / np.where(ok, top, 1), 0)
    d_bytes, d = _f16(np.where(ok, 1 / np.where(ok, iscale, 1), 0).astype(np.float32))
    return xs, scale, iscale, d_bytes, d


def quantize_q6_k(x: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K (210 bytes per 256): 128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, d."""
    shape = x.shape
    b = _blocks(x, QK_K)
    nb = len(b)
    xs, scale, iscale, d_bytes, d = _sixteen_scales(b, 32, 128, _per_weight(importance, shape, QK_K))
    ls = np.minimum(127, np.rint(iscale[:, None] * scale)).astype(np.int8)
    dl = d[:, None] * ls.astype(np.float32)
    safe = np.where(dl != 0, dl, 1.0)[..., None]
    q = np.where(dl[..., None] != 0, np.clip(np.rint(xs / safe), -32, 31), 0)
    decoded = (dl[..., None] * q.astype(np.float32)).reshape(nb, QK_K)
    lvl = (q + 32).astype(np.uint8).reshape(nb, 2, 4, 32)  # two halves of 128, four quarters of 32
    q1, q2, q3, q4 = (lvl[:, :, k] for k in range(4))
    ql = np.concatenate([(q1 & 0xF) | ((q3 & 0xF) << 4), (q2 & 0xF) | ((q4 & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)).reshape(nb, 64)
    return _rows(np.hstack([ql, qh, ls.view(np.uint8), d_bytes]), shape), decoded.reshape(shape)


def quantize_q3_k(x: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K (110 bytes per 256): 32 bytes high-bit mask, 64 bytes 2-bit levels, 12 scale bytes, d."""
    shape = x.shape
    b = _blocks(x, QK_K)
    nb = len(b)
    xs, scale, iscale, d_bytes, d = _sixteen_scales(b, 4, 32, _per_weight(importance, shape, QK_K))
    ls = (np.clip(np.rint(iscale[:, None] * scale), -32, 31) + 32).astype(np.uint8)  # 0..63
    dl = d[:, None] * (ls.astype(np.int8) - np.int8(32)).astype(np.float32)
    safe = np.where(dl != 0, dl, 1.0)[..., None]
    q = np.where(dl[..., None] != 0, np.clip(np.rint(xs / safe), -4, 3), 0)
    decoded = (dl[..., None] * q.astype(np.float32)).reshape(nb, QK_K)
    lvl = (q + 4).astype(np.uint8).reshape(nb, QK_K)  # 0..7
    scales = np.zeros((nb, 12), dtype=np.uint8)
    scales[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    for j in range(16):
        scales[:, 8 + j % 4] |= (ls[:, j] >> 4) << (2 * (j // 4))
    high = (lvl >> 2).reshape(nb, 8, 32)  # bit b of hmask[m] is the high bit of level b*32 + m
    hmask = np.zeros((nb, 32), dtype=np.uint8)
    for bit in range(8):
        hmask |= high[:, bit] << bit
    low = (lvl & 3).reshape(nb, 2, 4, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)).reshape(nb, 64)
    return _rows(np.hstack([hmask, qs, scales, d_bytes]), shape), decoded.reshape(shape)


IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
_IQ4_NL_MIDPOINTS = (IQ4_NL_VALUES[1:] + IQ4_NL_VALUES[:-1]) / 2


def quantize_iq4_nl(x: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """IQ4_NL (18 bytes per 32): fp16 d and 4-bit indices into a fixed non-linear grid."""
    shape = x.shape
    b = _blocks(x, 32)
    top = _signed_max(b)
    ok = top != 0
    safe = np.where(ok, top, 1.0)
    w = b * b if importance is None else _per_weight(importance, shape, 32) * (b * b)
    best = np.full(len(b), -np.inf)
    best_d = np.zeros(len(b))
    best_idx = np.zeros(b.shape, dtype=np.uint8)
    for step in range(-7, 8):
        inv = (step + IQ4_NL_VALUES[0]) / safe
        idx = np.searchsorted(_IQ4_NL_MIDPOINTS, inv[:, None] * b).astype(np.uint8)  # nearest grid value
        q = IQ4_NL_VALUES[idx]
        sumqx, sumq2 = (w * q * b).sum(1), (w * q * q).sum(1)
        good = ok & (sumq2 > 0)
        d = sumqx / np.where(good, sumq2, 1.0)
        score = np.where(good, d * sumqx, -np.inf)
        better = score > best
        best, best_d = np.where(better, score, best), np.where(better, d, best_d)
        best_idx = np.where(better[:, None], idx, best_idx)
    d_bytes, d = _f16(best_d.astype(np.float32))
    decoded = d[:, None] * IQ4_NL_VALUES[best_idx]
    qs = best_idx[:, :16] | (best_idx[:, 16:] << 4)
    return _rows(np.hstack([d_bytes, qs]), shape), decoded.reshape(shape)


def _rows(blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Blocks laid out as the GGUF writer wants them: one row of bytes per tensor row."""
    return np.ascontiguousarray(blocks.astype(np.uint8)).reshape(*shape[:-1], -1)


def _weighted_q_0(x: np.ndarray, importance: np.ndarray, nmax: int):
    """Q4_0 / Q5_0 with an importance: the scale of each block of 32 chosen by weighted least squares
    (ggml's quantize_row_q4_0_impl: weights importance * sqrt(mean x^2 + x^2)); levels in [-nmax, nmax)."""
    b = _blocks(x, 32)
    sigma2 = (b * b).mean(1, keepdims=True)
    w = _per_weight(importance, x.shape, 32) * np.sqrt(sigma2 + b * b)
    scale, lvl = _qx(b, nmax, w, with_levels=True)
    d_bytes, d = _f16(scale)
    return d_bytes, d, (lvl + nmax).astype(np.uint8)


def quantize_q4_0_weighted(x: np.ndarray, importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 (18 bytes per 32): fp16 d, 16 bytes of 4-bit levels (low nibbles: the first 16 values)."""
    d_bytes, d, q = _weighted_q_0(x, importance, 8)
    decoded = d[:, None] * (q.astype(np.float32) - 8)
    return _rows(np.hstack([d_bytes, q[:, :16] | (q[:, 16:] << 4)]), x.shape), decoded.reshape(x.shape)


def quantize_q5_0_weighted(x: np.ndarray, importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q5_0 (22 bytes per 32): fp16 d, 32 high bits (little-endian uint32), 16 bytes of low nibbles."""
    d_bytes, d, q = _weighted_q_0(x, importance, 16)
    decoded = d[:, None] * (q.astype(np.float32) - 16)
    high = (q >> 4).astype(np.uint32)
    qh = (high << np.arange(32, dtype=np.uint32)).sum(1, dtype=np.uint32)
    low = q & 0xF
    return (_rows(np.hstack([d_bytes, qh.astype("<u4").view(np.uint8).reshape(-1, 4),
                             low[:, :16] | (low[:, 16:] << 4)]), x.shape), decoded.reshape(x.shape))


_WEIGHTED_ONLY = {"Q4_0": quantize_q4_0_weighted, "Q5_0": quantize_q5_0_weighted}
_OURS = {"Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k,
         "IQ4_NL": quantize_iq4_nl}
QUANTIZERS = dict(_OURS)
