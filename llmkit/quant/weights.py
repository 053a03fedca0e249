"""The quantizers: a float weight (or activation) to integers and the scales that bring it back.
Shared by the packed linear layers of generation (linear.py) and QLoRA's frozen base (peft/qlora.py)."""

from __future__ import annotations

import torch


def quantize_int8(w: torch.Tensor):
    """Symmetric per-output-channel int8: w ≈ q * scale."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int, importance: torch.Tensor | None = None):
    """Asymmetric int4 per group of inputs: w ≈ (q - 8) * scale + zero, q in [0, 15]; each group's grid
    spans its min and max. With `importance` (one non-negative weight per input column: llama.cpp's
    imatrix, the mean squared activation of each input channel) that is not uniform, each group takes the
    grid of lowest importance-weighted squared error among min/max and the searched ones (llama.cpp's
    make_qkx2_quants, `gguf_quants.qkx2`, as the K-quants choose theirs); a uniform importance says no
    column matters more and keeps min/max."""
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    if importance is not None:
        if importance.shape != (k,) or not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
            raise ValueError(f"importance of shape {tuple(importance.shape)}; expected {k} finite non-negative "
                             "weights, one per input column")
        if importance.max() > importance.min():  # llama.cpp's search, with the zero point free to be signed
            from llmkit.formats.gguf_quants import qkx2

            rows = g.reshape(-1, group_size).double().numpy()
            weight = importance.double().expand(n, k).reshape(-1, group_size).numpy()
            step, low = qkx2(rows, weight, 15, -1.0, 0.1, 20, signed_min=True)
            scale = torch.from_numpy(step).to(g).reshape(n, -1, 1).clamp(min=1e-8)
            lo = -torch.from_numpy(low).to(g).reshape(n, -1, 1)
    q = torch.round((g - lo) / scale).clamp(0, 15).reshape(n, k)
    scale, zero = scale[..., 0], (lo + 8.0 * scale)[..., 0]
    return q.to(torch.int32), scale, zero, dequantize_int4(q, scale, zero)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - 8) * scale + zero, q (rows, inputs) and scale/zero one per group of inputs (rows, groups)."""
    n, k = q.shape
    groups = scale.shape[-1]
    return ((q.float() - 8.0).reshape(n, groups, k // groups) * scale[..., None] + zero[..., None]).reshape(n, k)


def int8_rows(x: torch.Tensor):
    """Symmetric per-row int8 of activations: x ≈ q * scale, scale of shape (rows, 1)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(x / scale).to(torch.int8), scale

