"""The quantizers: a float weight (or activation) to integers and the scales that bring it back.
Shared by the packed linear layers of generation (linear.py) and QLoRA's frozen base (peft/qlora.py)."""

from __future__ import annotations

import torch


def quantize_int8(w: torch.Tensor):
    """Symmetric per-output-channel int8: w ≈ q * scale."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int):
    """Asymmetric int4 per group of inputs: w ≈ (q - 8) * scale + zero, q in [0, 15]."""
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    q = torch.round((g - lo) / scale).clamp(0, 15)
    zero = lo + 8.0 * scale
    dequant = ((q - 8.0) * scale + zero).reshape(n, k)
    return q.reshape(n, k).to(torch.int32), scale[..., 0], zero[..., 0], dequant


def int8_rows(x: torch.Tensor):
    """Symmetric per-row int8 of activations: x ≈ q * scale, scale of shape (rows, 1)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(x / scale).to(torch.int8), scale
