"""Objectives: loss functions `(model, batch) -> (loss, metrics)` that plug into the one loop.

`metrics` holds detached scalars the loop logs; `tokens` (the number of scored tokens) feeds the
throughput counters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _inputs_and_labels(batch):
    if isinstance(batch, dict):
        return batch["input_ids"], batch["labels"], batch.get("attention_mask")
    x, y = batch
    return x, y, None


def causal_lm_loss(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy (teacher forcing). `batch` is `(x, y)` with y = x shifted left,
    or a dict with `input_ids`, `labels` (IGNORE_INDEX where unscored) and `attention_mask`.

    The mean is over scored tokens, computed in at least fp32 even under autocast."""
    x, y, mask = _inputs_and_labels(batch)
    logits = model(x, attention_mask=mask) if mask is not None else model(x)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    return loss, {"loss": loss.detach(), "tokens": (y != IGNORE_INDEX).sum()}
