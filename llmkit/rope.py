"""Rotary position embeddings: the frequencies of each layer kind, and long-context scaling.

`rope_scaling` follows transformers' `config.json` form (a dict with "rope_type" and that type's
keys), so a checkpoint's scaling is read and written unchanged. Only the frequencies (and, for
YaRN, an attention factor on cos/sin) depend on the type; the rotation itself is one function in
model.py. Each type computes exactly what transformers' `ROPE_INIT_FUNCTIONS` computes (same fp32
arithmetic), which tests/test_rope.py checks. Sits on the config floor: config.py validates with
it and translates config.json / GGUF keys through it, model.py computes with it.

The trained context ("original_max_position_embeddings") is required for yarn and llama3, as in
transformers; for dynamic it defaults to the model's max positions, as transformers' dynamic NTK
uses `max_position_embeddings` as the trained length. Reading a config.json fills it in, so a
llmkit dict always states it for the types whose frequencies depend on it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llmkit.errors import ConfigError

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")  # besides "default" (no scaling)
_ORIGINAL = "original_max_position_embeddings"
# (required, optional) keys of each type, besides "rope_type" ("type" in transformers v4 configs).
_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "linear": (frozenset({"factor"}), frozenset({_ORIGINAL})),  # original: only for effective_context
    "dynamic": (frozenset({"factor"}), frozenset({_ORIGINAL})),
    "yarn": (frozenset({"factor", _ORIGINAL}),
             frozenset({"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"})),
    "llama3": (frozenset({"factor", _ORIGINAL, "low_freq_factor", "high_freq_factor"}), frozenset()),
}
_INT_KEYS = (_ORIGINAL,)
_POSITIVE_KEYS = ("factor", "attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow",
                  "low_freq_factor", "high_freq_factor")


def rope_type(scaling: dict[str, Any] | None) -> str:
    """ "default" for None, else the dict's "rope_type" (or transformers v4's "type")."""
    if scaling is None:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def is_dynamic(scaling: dict[str, Any] | None) -> bool:
    """Whether the frequencies depend on the forward's length (dynamic NTK): cos/sin cannot be cached."""
    return rope_type(scaling) == "dynamic"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """Raise ConfigError unless `scaling` is None or a supported, complete `rope_scaling` dict.

    Every key is honoured or refused by name: a key of transformers' that llmkit does not compute
    (e.g. partial_rotary_factor other than 1.0) is an error, never silently ignored.
    """
    if scaling is None:
        return
    example = "{'rope_type': 'linear', 'factor': 4.0}"
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be None or a dict like {example}, got {scaling!r}")
    if "rope_type" in scaling and "type" in scaling and scaling["rope_type"] != scaling["type"]:
        raise ConfigError(f"rope_scaling has rope_type={scaling['rope_type']!r} and type={scaling['type']!r}; "
                          "expected one of them, or both equal")
    kind = rope_type(scaling)
    if kind not in _KEYS:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported; expected one of {ROPE_TYPES} "
                          f"(or rope_scaling None for unscaled RoPE), e.g. {example}")
    required, optional = _KEYS[kind]
    given = set(scaling) - {"rope_type", "type"}
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"rope_scaling partial_rotary_factor={scaling['partial_rotary_factor']!r}: llmkit "
                          "rotates the whole head (1.0 only)")
    given.discard("partial_rotary_factor")
    if missing := sorted(required - given):
        raise ConfigError(f"rope_scaling {kind!r} needs the key(s) {missing}; it takes {sorted(required)} "
                          f"and optionally {sorted(optional)}")
    if unknown := sorted(given - required - optional):
        raise ConfigError(f"rope_scaling {kind!r} has key(s) {unknown} that llmkit does not use; it takes "
                          f"{sorted(required)} and optionally {sorted(optional)}")
    for key in given:
        value = scaling[key]
        if key in _INT_KEYS and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f"rope_scaling {kind!r}: {key} must be a positive integer, got {value!r}")
        if key in _POSITIVE_KEYS and not (_is_number(value) and value > 0):
            raise ConfigError(f"rope_scaling {kind!r}: {key} must be a positive number, got {value!r}")
        if key == "truncate" and not isinstance(value, bool):
            raise ConfigError(f"rope_scaling {kind!r}: truncate must be true or false, got {value!r}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ConfigError(f"rope_scaling 'llama3': high_freq_factor ({scaling['high_freq_factor']}) must be "
                          f"greater than low_freq_factor ({scaling['low_freq_factor']})")


def original_context(scaling: dict[str, Any] | None, max_position_embeddings: int) -> int:
    """The trained context the scaling stretches (transformers' fallback: max_position_embeddings)."""
    return int((scaling or {}).get(_ORIGINAL, max_position_embeddings))


def _default(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
                            / head_dim))


def inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None, max_position_embeddings: int,
             seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies of shape (head_dim/2,) in fp32, attention factor multiplying cos and sin).

    `max_position_embeddings` is the model's max positions (ModelConfig.max_seq_len), the trained
    context when the dict does not state one. `seq_len` (the longest position + 1 of this forward)
    is read by "dynamic" only: up to the trained context it gives the unscaled frequencies, beyond
    it transformers' NTK-aware base for that length. transformers keeps the largest length seen
    since the last short forward; computing from each forward's own length equals it whenever the
    sequence only grows (a prefill, then decoding), which is how a KV cache is used.
    """
    kind = rope_type(scaling)
    if kind == "default":
        return _default(head_dim, theta, device), 1.0
    factor = scaling["factor"]
    if kind == "linear":
        return _default(head_dim, theta, device) / factor, 1.0
    if kind == "dynamic":
        return _dynamic(head_dim, theta, factor, original_context(scaling, max_position_embeddings), seq_len, device)
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, device)
    if kind == "llama3":
        return _llama3(head_dim, theta, scaling, device), 1.0
    raise ConfigError(f"rope_scaling type {kind!r} is not supported; expected one of {ROPE_TYPES}")


def _dynamic(head_dim: int, theta: float, factor: float, original: int, seq_len: int | None,
             device=None) -> tuple[torch.Tensor, float]:
    """Dynamic NTK: raise the base so the longest wavelength covers `seq_len` (transformers' formula,
    evaluated at the trained length too, as transformers does at init, for identical short-sequence values)."""
    seq_len = max(seq_len or original, original)
    base = theta * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return _default(head_dim, base, device), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 * mscale * ln(scale) + 1 (eq. 21 of the paper)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, theta: float, s: dict[str, Any], device=None) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies, keep the high ones, a linear ramp between (by rotations
    over the trained context: beta_fast 32 and beta_slow 1 by default), and scale attention."""
    factor, original = s["factor"], s[_ORIGINAL]
    attention = s.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
        else:
            attention = yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(device=device, dtype=torch.float) / head_dim)
    extrapolation = 1 - ramp.to(device=device, dtype=torch.float)
    freqs = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return freqs, attention


def _llama3(head_dim: int, theta: float, s: dict[str, Any], device=None) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than original/low_freq_factor divided by factor, shorter than
    original/high_freq_factor kept, a smooth blend between."""
    freqs = _default(head_dim, theta, device)
    factor, low, high, original = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s[_ORIGINAL]
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / factor, freqs)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def effective_context(config) -> int:
    """The context a model's RoPE is designed for: the trained context x factor.

    linear, dynamic, yarn and llama3 all stretch the trained context `factor` times; linear with no
    stated original context counts `max_seq_len` as already stretched (Gemma-3 and most linearly
    scaled checkpoints state the long context there). Without scaling it is `max_seq_len`.
    `config.max_seq_len` is the model's hard limit (transformers' max_position_embeddings); reading
    a config.json raises it to this figure where the scaling reaches further, and a user may set it
    lower (or higher, extrapolating) with `config.replace(max_seq_len=...)`.
    """
    scaling = config.rope_scaling
    kind = rope_type(scaling)
    if kind == "default" or (kind == "linear" and _ORIGINAL not in scaling):
        return int(config.max_seq_len)
    return int(original_context(scaling, config.max_seq_len) * scaling["factor"])


def describe(config) -> str:
    """One line for `llmkit info`: the effective context and how it is reached."""
    scaling, n = config.rope_scaling, effective_context(config)
    if config.pos_embedding != "rope" or rope_type(scaling) == "default":
        return f"{n:,} positions (max_seq_len; no RoPE scaling)"
    kind = rope_type(scaling)
    how = (f"original {original_context(scaling, config.max_seq_len):,} x factor {scaling['factor']:g}"
           if kind != "linear" or _ORIGINAL in scaling else f"max_seq_len, factor {scaling['factor']:g}")
    return f"{n:,} positions ({kind} RoPE scaling: {how}); the model accepts up to max_seq_len {config.max_seq_len:,}"


# ---- config.json (transformers v4 `rope_scaling`, v5 `rope_parameters`) ----

def rope_from_hf(hf: dict[str, Any], source: str = "config.json", rope: dict[str, Any] | None = None,
                 ) -> dict[str, Any]:
    """ModelConfig fields (rope_theta, rope_scaling, max_seq_len) from a transformers config.json.

    `rope` is the rope dict to read when a family nests one per layer type (Gemma-3's
    rope_parameters["full_attention"]); by default v5's `rope_parameters`, else v4's `rope_scaling`.
    The trained context is filled in from max_position_embeddings where transformers does (yarn,
    llama3, and dynamic, whose trained length it is), and max_seq_len is raised to the context the
    scaling reaches, so that the scaled positions are usable.
    """
    if rope is None:
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: rope_parameters / rope_scaling must be a JSON object, got {rope!r}")
    if any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError(f"{source}: rope_parameters is nested by layer type ({sorted(rope)}); expected one "
                          "rope dict (a family with several reads each with rope_from_hf(hf, rope=...))")
    max_pos = int(hf.get("max_position_embeddings", 2048))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": None, "max_seq_len": max_pos}
    scaling = {"rope_type": kind, **{k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta")}}
    if "partial_rotary_factor" not in scaling and hf.get("partial_rotary_factor", 1.0) != 1.0:
        scaling["partial_rotary_factor"] = hf["partial_rotary_factor"]  # so that check_rope_scaling refuses it
    if kind == "dynamic":  # transformers' dynamic NTK reads the trained length from max_position_embeddings
        scaling[_ORIGINAL] = max_pos
    elif kind in ("yarn", "llama3"):  # as transformers: a top-level value first (Phi-3), then the dict's
        scaling[_ORIGINAL] = hf.get(_ORIGINAL, scaling.get(_ORIGINAL, max_pos))
    try:
        check_rope_scaling(scaling)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    scaling.pop("partial_rotary_factor", None)  # 1.0: the only value, so not stored
    max_seq_len = max_pos
    if kind != "linear":
        max_seq_len = max(max_pos, int(scaling[_ORIGINAL] * scaling["factor"]))
    return {"rope_theta": theta, "rope_scaling": scaling, "max_seq_len": max_seq_len}


def rope_to_hf(theta: float, scaling: dict[str, Any] | None, max_seq_len: int) -> dict[str, Any]:
    """config.json keys for the RoPE of a model: both transformers v4's (rope_theta, rope_scaling) and
    v5's (rope_parameters), and max_position_embeddings, which transformers' dynamic NTK reads as the
    trained length (so it is the trained context there, and max_seq_len otherwise)."""
    kind = rope_type(scaling)
    if kind == "default":
        return {"max_position_embeddings": max_seq_len, "rope_theta": theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    hf_scaling = {"rope_type": kind, **{k: v for k, v in scaling.items() if k not in ("rope_type", "type")}}
    max_pos = max_seq_len
    if kind == "dynamic":  # transformers' dynamic takes the trained length from max_position_embeddings
        max_pos = hf_scaling.pop(_ORIGINAL, max_seq_len)
    return {"max_position_embeddings": max_pos, "rope_theta": theta, "rope_scaling": hf_scaling,
            "rope_parameters": {**hf_scaling, "rope_theta": theta}}
