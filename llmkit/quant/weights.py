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
    grid of lowest importance-weighted squared error among min/max and the searched ones
    (`_weighted_grid`); a uniform importance says no column matters more and keeps min/max."""
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    if importance is not None:
        if importance.shape != (k,) or not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
            raise ValueError(f"importance of shape {tuple(importance.shape)}; expected {k} finite non-negative "
                             "weights, one per input column")
        if importance.max() > importance.min():
            lo, scale = _weighted_grid(g, importance.to(g).reshape(1, k // group_size, group_size), lo, hi, scale)
    q = torch.round((g - lo) / scale).clamp(0, 15)
    zero = lo + 8.0 * scale
    dequant = ((q - 8.0) * scale + zero).reshape(n, k)
    return q.reshape(n, k).to(torch.int32), scale[..., 0], zero[..., 0], dequant


def int8_rows(x: torch.Tensor):
    """Symmetric per-row int8 of activations: x ≈ q * scale, scale of shape (rows, 1)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(x / scale).to(torch.int8), scale


def _weighted_grid(g: torch.Tensor, weight: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor,
                   steps: int = 20):
    """(lo, scale) per group minimising sum_j weight_j (g_j - (q_j scale + lo))^2, q = round((g - lo) / scale),
    as llama.cpp's make_qkx2_quants searches (rmin -1, rdelta 0.1, 20 steps): for each trial range
    (15 - 1 + 0.1 i) / (max - min) the levels are rounded, then the weighted least-squares line through
    them gives the grid; a group keeps a trial only if its weighted error, re-rounded on that grid, is lower
    than the best so far (min/max first), so no group ends worse than min/max."""
    def error(lo, scale):
        q = torch.round((g - lo) / scale).clamp(0, 15)
        return (weight * (q * scale + lo - g).square()).sum(-1, keepdim=True)

    best = error(lo, scale)
    low, span = lo, (hi - lo).clamp(min=1e-8)
    total = weight.sum(-1, keepdim=True)
    wg = weight * g
    sum_x = wg.sum(-1, keepdim=True)
    for i in range(steps + 1):
        levels = torch.round((g - low) * ((14.0 + 0.1 * i) / span)).clamp(0, 15)
        wl = weight * levels
        sum_l, sum_l2, sum_xl = wl.sum(-1, keepdim=True), (wl * levels).sum(-1, keepdim=True), (wg * levels).sum(
            -1, keepdim=True)
        det = total * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, 1.0)
        trial_scale = (total * sum_xl - sum_x * sum_l) / det
        trial_lo = (sum_l2 * sum_x - sum_l * sum_xl) / det
        ok &= trial_scale > 1e-8
        trial_scale = torch.where(ok, trial_scale, scale)
        trial_lo = torch.where(ok, trial_lo, lo)
        e = error(trial_lo, trial_scale)
        better = ok & (e < best)
        best = torch.where(better, e, best)
        lo, scale = torch.where(better, trial_lo, lo), torch.where(better, trial_scale, scale)
    return lo, scale
