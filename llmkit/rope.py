"""Rotary position embeddings: the frequencies of each layer kind, and long-context scaling.

`rope_scaling` follows transformers' `config.json` form (a dict with "rope_type" and that type's
keys), so a checkpoint's scaling is read and written unchanged. Only the frequencies (and, for
YaRN, an attention factor on cos/sin) depend on the type; the rotation itself is one function in
model.py. Sits on the config floor: config.py validates with it, model.py computes with it.
"""

from __future__ import annotations

from typing import Any

import torch

from llmkit.errors import ConfigError

ROPE_TYPES = ("linear",)  # besides "default" (no scaling)


def check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """Raise ConfigError unless `scaling` is None or a supported, complete `rope_scaling` dict."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be None or a dict like {{'rope_type': 'linear', 'factor': 4.0}}, "
                          f"got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported; expected one of {ROPE_TYPES}")
    factor = scaling.get("factor")
    if not isinstance(factor, int | float) or isinstance(factor, bool) or not factor > 0:
        raise ConfigError(f"rope_scaling {kind!r} needs a positive 'factor', got {factor!r}")


def is_dynamic(scaling: dict[str, Any] | None) -> bool:
    """Whether the frequencies depend on the length of the current forward (dynamic NTK)."""
    return scaling is not None and scaling.get("rope_type") == "dynamic"


def inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None, max_position_embeddings: int,
             seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies of shape (head_dim/2,), attention factor) for one layer kind."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return freqs, 1.0
    return freqs / float(scaling["factor"]), 1.0  # linear position interpolation
