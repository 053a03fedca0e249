"""GPTQ (Frantar et al. 2022) for the int4 weight-only path: the same int4 grid as round-to-nearest
(`weights.quantize_int4`: asymmetric, one scale and zero per group of inputs), but the columns are
quantized one at a time and each one's rounding error is pushed onto the columns not yet quantized,
weighted by the inverse Hessian of the layer's output error on calibration activations
(H = X^T X): the optimal brain surgeon update, which lowers ||X W^T - X W_q^T|| instead of ||W - W_q||.

Groups take their scale and zero from the weights as they stand when the group's first column is
reached (already corrected by the earlier columns), as the reference implementation does.
"""

from __future__ import annotations

import torch

from llmkit.errors import ConfigError


def _group_grid(w: torch.Tensor):
    """The int4 grid of one group (rows, group_size): lo and scale, as `quantize_int4` chooses them."""
    lo, hi = w.amin(1), w.amax(1)
    return lo, ((hi - lo) / 15.0).clamp(min=1e-8)


@torch.no_grad()
def gptq_int4(weight: torch.Tensor, gram: torch.Tensor, group_size: int = 32, damp: float = 0.01, block: int = 128):
    """(q int32 (n, k) in [0, 15], scale (n, k/g), zero (n, k/g), dequantized (n, k)) with the layout of
    `quantize_int4`: w ≈ (q - 8) * scale + zero. `gram` is X^T X (k, k) of the layer's inputs."""
    n, k = weight.shape
    if k % group_size or block % group_size:
        raise ConfigError(f"GPTQ needs in_features ({k}) and block ({block}) divisible by group_size ({group_size})")
    if gram.shape != (k, k):
        raise ConfigError(f"GPTQ Gram matrix of shape {tuple(gram.shape)}; expected ({k}, {k})")
    w = weight.detach().double().clone()
    h = gram.detach().double().clone()
    dead = h.diagonal() == 0  # inputs never active: any value works, the reference zeroes them
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(n, k, dtype=torch.int32)
    scale = torch.zeros(n, k // group_size, dtype=torch.float64)
    lo = torch.zeros_like(scale)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=torch.float64)
        h1 = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            g = col // group_size
            if col % group_size == 0:
                lo[:, g], scale[:, g] = _group_grid(w1[:, j:j + group_size])
            qc = torch.round((w1[:, j] - lo[:, g]) / scale[:, g]).clamp(0, 15)
            q[:, col] = qc.to(torch.int32)
            e = (w1[:, j] - (qc * scale[:, g] + lo[:, g])) / h1[j, j]
            w1[:, j:] -= e[:, None] * h1[j, j:][None, :]
            err[:, j] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    scale32 = scale.float()
    zero = (lo + 8.0 * scale).float()  # quantize_int4's zero: w = (q - 8) * scale + zero
    dequant = ((q.float() - 8.0).view(n, -1, group_size) * scale32[..., None] + zero[..., None]).view(n, k)
    return q, scale32, zero, dequant
