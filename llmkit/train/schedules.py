"""Learning-rate schedules as pure functions of the step: lr(step) = peak_lr * factor(step).

- cosine: linear warmup, then cosine decay to `min_lr_ratio` (GPT-3, Chinchilla).
- wsd: warmup, a long stable phase, then a linear cooldown over the last `decay_fraction` of
  training (MiniCPM's warmup-stable-decay).
- inv_sqrt: warmup, then decay with 1/sqrt(step) ("Attention Is All You Need").
- constant: warmup, then flat.

And the shape of a step's batch as training goes on (`batch_shape`), for token batches (x, y):
- sequence-length warmup (Li et al. 2022; modded-nanogpt grows its attention window): over the first
  `seq_warmup` of training the sequences are `seq_start` tokens, doubling in equal parts of the warmup up to
  the context (a `seq_start` at or above the context leaves every sequence at the context). A window of the
  context is cut into shorter rows, so a step keeps its tokens and the data order is unchanged (resume stays
  exact); early steps attend over less and run faster.
- batch-size warmup (GPT-3's ramp): over the first `batch_warmup` of training the step takes the first
  `batch_start` of its rows, growing linearly to all of them (the rows left out are skipped, not deferred):
  more, smaller updates while the loss falls fastest.
"""

from __future__ import annotations

import math

from llmkit.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "inv_sqrt", "constant")


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1,
              decay_fraction: float = 0.2) -> float:
    """The multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule={schedule!r}; expected one of {SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "inv_sqrt":
        return math.sqrt(max(warmup_steps, 1) / (step + 1))
    if schedule == "wsd":
        decay_start = int(max_steps * (1 - decay_fraction))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, max_steps - decay_start)
        return 1.0 - (1.0 - min_lr_ratio) * min(1.0, progress)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def seq_len_at(progress: float, context: int, seq_start: int, seq_warmup: float) -> int:
    """The sequence length at `progress` (0..1 of training): `seq_start` doubling to `context` over `seq_warmup`."""
    if seq_warmup <= 0 or progress >= seq_warmup or seq_start >= context:
        return context
    levels = round(math.log2(context // seq_start)) + 1  # seq_start, 2 seq_start, ..., context
    return seq_start * 2 ** min(levels - 1, int(progress / seq_warmup * levels))


def rows_at(progress: float, rows: int, batch_start: float, batch_warmup: float) -> int:
    """The rows of a step at `progress`: `batch_start` of `rows` growing linearly to all over `batch_warmup`."""
    if batch_warmup <= 0 or progress >= batch_warmup:
        return rows
    return max(1, min(rows, round(rows * (batch_start + (1 - batch_start) * progress / batch_warmup))))


def check_batch_schedule(seq_start: int, seq_warmup: float, batch_start: float, batch_warmup: float,
                         context: int | None = None) -> None:
    """Refuse fractions out of range and (given the context) a `seq_start` that cannot cut it evenly."""
    for name, value in (("seq_warmup", seq_warmup), ("batch_warmup", batch_warmup)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{name}={value} is the share of training it lasts; expected 0 <= {name} <= 1")
    if not 0 < batch_start <= 1:
        raise ConfigError(f"batch_start={batch_start} is the share of the rows a step starts with; expected "
                          "0 < batch_start <= 1")
    if seq_warmup > 0 and seq_start <= 0:
        raise ConfigError(f"seq_start={seq_start}; expected a positive sequence length")
    if seq_warmup > 0 and context is not None and seq_start < context:  # at or above it: the context throughout
        ratio = context // seq_start
        if context % seq_start or ratio & (ratio - 1):
            raise ConfigError(f"seq_start={seq_start} must divide the context {context} by a power of two (it doubles "
                              "up to the context, and the context's windows are cut into rows of it)")


def batch_shape(batch, at: float, seq_start: int, seq_warmup: float, batch_start: float, batch_warmup: float):
    """The token batch (x, y) as the schedules shape it at `at` (share of training done): its first
    `rows_at` rows, each split into rows of `seq_len_at` tokens (x and y cut alike, so y stays x's next tokens)."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(hasattr(t, "reshape") for t in batch)):
        raise ConfigError("seq_warmup / batch_warmup shape the token batches (x, y) of pretraining; this "
                          f"objective's batches are {type(batch).__name__}s")
    rows = rows_at(at, batch[0].shape[0], batch_start, batch_warmup)
    seq_len = seq_len_at(at, batch[0].shape[1], seq_start, seq_warmup)
    if batch[0].shape[1] % seq_len:  # pretrain checks its context up front; another recipe's batches land here
        raise ConfigError(f"seq_start={seq_start} cannot cut this batch's {batch[0].shape[1]}-token rows into rows of "
                          f"{seq_len}; expected it to divide them by a power of two")
    return tuple(t[:rows].reshape(-1, seq_len) for t in batch)
