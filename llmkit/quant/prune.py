"""Unstructured pruning: zero the least important weights of every linear layer of the blocks.

- magnitude: score |W|, the lowest fraction of each layer's weights go (the Wanda paper's baseline);
- Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, the input channel's activation norm over
  calibration text, compared within each output row, so a channel that carries large activations
  keeps its weights even when they are small;
- N:M (2:4 for sparse tensor cores): in every group of M consecutive weights along the input
  dimension, the M - N lowest-scoring go, leaving N.

The embeddings and the LM head stay dense, as in the paper. Masks are applied in place; the
weights stay dense tensors with zeros (a smaller, faster model is structured pruning's job).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from llmkit.errors import ConfigError
from llmkit.quant.calibrate import Calibration, linear_layers

METHODS = ("magnitude", "wanda")


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity={sparsity!r}; expected a fraction in [0, 1)")


def parse_n_m(pattern: str | Sequence[int] | None) -> tuple[int, int] | None:
    """'2:4' or (2, 4) -> (2, 4): N kept of every M; refuses N >= M or N < 1."""
    if pattern is None or pattern == "":
        return None
    try:
        n, m = (int(v) for v in (pattern.split(":") if isinstance(pattern, str) else pattern))
    except ValueError:
        raise ConfigError(f"N:M pattern {pattern!r}; expected two integers as 'N:M', e.g. '2:4'") from None
    if not 0 < n < m:
        raise ConfigError(f"N:M pattern {n}:{m}; expected 0 < N < M (N weights kept of every M)")
    return n, m


def scores(weight: torch.Tensor, method: str, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each weight: |W| (magnitude) or |W| * ||X_j|| (Wanda)."""
    if method == "magnitude":
        return weight.detach().abs().float()
    if method == "wanda":
        if input_norm is None:
            raise ConfigError("Wanda needs calibration statistics (input activation norms); got none")
        return weight.detach().abs().float() * input_norm.float()[None, :]
    raise ConfigError(f"pruning method {method!r}; expected one of {', '.join(METHODS)}")


def mask_for(score: torch.Tensor, sparsity: float, method: str, n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean keep-mask: N:M groups along the inputs, else Wanda per output row, magnitude per layer."""
    rows, cols = score.shape
    keep = torch.ones_like(score, dtype=torch.bool)
    if n_m is not None:
        n, m = n_m
        if cols % m:
            raise ConfigError(f"N:M pattern {n}:{m} needs in_features divisible by {m}; got {cols}")
        groups = score.reshape(rows, cols // m, m)
        drop = groups.topk(m - n, dim=-1, largest=False).indices
        keep.view(rows, cols // m, m).scatter_(-1, drop, False)
        return keep
    check_sparsity(sparsity)
    if method == "wanda":  # per output row
        k = int(cols * sparsity)
        if k:
            keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    else:  # the whole layer
        k = int(score.numel() * sparsity)
        if k:
            keep.view(-1)[score.reshape(-1).topk(k, largest=False).indices] = False
    return keep


@torch.no_grad()
def prune(model: nn.Module, method: str = "wanda", sparsity: float | Sequence[float] = 0.5,
          n_m: str | Sequence[int] | None = None, calibration: Calibration | None = None) -> dict[str, float]:
    """Zero weights of every linear layer of `model.blocks` in place; returns each layer's achieved sparsity.

    `sparsity` is one fraction for all layers, or one per block (per-layer targets, as OWL sets them).
    """
    if method not in METHODS:
        raise ConfigError(f"pruning method {method!r}; expected one of {', '.join(METHODS)}")
    pattern = parse_n_m(n_m)
    n_layer = len(model.blocks)
    per_layer = [sparsity] * n_layer if isinstance(sparsity, (int, float)) else list(sparsity)
    if len(per_layer) != n_layer:
        raise ConfigError(f"{len(per_layer)} per-layer sparsities for a model of {n_layer} layers; expected one each")
    for s in per_layer:
        check_sparsity(s)
    if method == "wanda" and calibration is None:
        raise ConfigError("Wanda needs calibration statistics (llmkit.quant.calibrate); got none")
    achieved = {}
    for name, layer in linear_layers(model).items():
        norm = calibration.norm(name) if method == "wanda" else None
        keep = mask_for(scores(layer.weight, method, norm), per_layer[int(name.split(".")[1])], method, pattern)
        layer.weight.mul_(keep.to(layer.weight.dtype))
        achieved[name] = 1.0 - keep.float().mean().item()
    return achieved
