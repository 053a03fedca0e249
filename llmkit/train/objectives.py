"""Objectives: loss functions `(model, batch) -> (loss, metrics)` that plug into the one loop.

`metrics` holds detached scalars the loop logs; `tokens` (the number of scored tokens) feeds the
throughput counters.

- continued pretraining and SFT: `causal_lm_loss` (SFT batches carry IGNORE_INDEX labels on the
  prompt, the template and the padding; `llmkit.data.chat` builds them), also named `sft_loss`;
- sequence classification: `classification_loss` on `Transformer.classify` (last real token ->
  linear head -> cross-entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkit.data.collate import IGNORE_INDEX
from llmkit.model import Transformer
from llmkit.train.distributed import unwrap

__all__ = ["IGNORE_INDEX", "OBJECTIVES", "causal_lm_loss", "classification_loss", "sft_loss"]


def _inputs_and_labels(batch):
    if isinstance(batch, dict):
        return batch["input_ids"], batch["labels"], batch.get("attention_mask")
    x, y = batch
    return x, y, None


def causal_lm_loss(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy (teacher forcing). `batch` is `(x, y)` with y = x shifted left,
    or a dict with `input_ids`, `labels` (IGNORE_INDEX where unscored) and `attention_mask`.

    The mean is over scored tokens, computed in at least fp32 even under autocast. A Transformer
    (also under DDP, FSDP2 or torch.compile) computes it from its hidden states without the logits."""
    x, y, mask = _inputs_and_labels(batch)
    scored = y != IGNORE_INDEX
    if isinstance(unwrap(model), Transformer):
        loss = model(x, attention_mask=mask, labels=y)
    else:
        logits = (model(x, attention_mask=mask) if mask is not None else model(x)).flatten(0, 1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32, float64 stays
        loss = F.cross_entropy(logits, y.flatten(), ignore_index=IGNORE_INDEX)
    return loss, {"loss": loss.detach(), "tokens": scored.sum()}


# SFT is the causal-LM loss on masked labels: the mask lives in the data, not in the loss.
sft_loss = causal_lm_loss


def classification_loss(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of `model.classify` on a dict with `input_ids`, `attention_mask` and one class id
    per row in `labels`; metrics add the batch accuracy."""
    logits = model.classify(batch["input_ids"], batch.get("attention_mask")).float()
    labels = batch["labels"]
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return loss, {"loss": loss.detach(), "accuracy": accuracy.detach(), "tokens": (batch["attention_mask"].sum() if "attention_mask" in batch
                                                                   else batch["input_ids"].new_tensor(batch["input_ids"].numel()))}


OBJECTIVES = {"pretrain": causal_lm_loss, "sft": sft_loss, "classify": classification_loss}
