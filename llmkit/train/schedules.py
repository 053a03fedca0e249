"""Learning-rate schedules as pure functions of the step: lr(step) = peak_lr * factor(step).

- cosine: linear warmup, then cosine decay to `min_lr_ratio` (GPT-3, Chinchilla).
- wsd: warmup, a long stable phase, then a linear cooldown over the last `decay_fraction` of
  training (MiniCPM's warmup-stable-decay).
- inv_sqrt: warmup, then decay with 1/sqrt(step) ("Attention Is All You Need").
- constant: warmup, then flat.
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
