"""Figures people look at, written as PNG with matplotlib's non-interactive backend."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training_curves(metrics: str | os.PathLike | list[dict], out: str | os.PathLike,
                         title: str = "training") -> Path:
    """Train loss per step (and its smoothed trend) with validation loss; perplexity on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics) if not isinstance(metrics, list) else metrics
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps, losses = zip(*train, strict=True)
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="train (per step)")
        window = max(1, len(losses) // 25)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax_loss.plot(steps, smooth, color="tab:blue", label=f"train (mean of {window})")
    if val:
        steps, losses = zip(*val, strict=True)
        ax_loss.plot(steps, losses, "o-", color="tab:orange", label="validation")
        import math

        ax_ppl.plot(steps, [math.exp(v) for v in losses], "o-", color="tab:orange")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=f"{title}: loss")
    ax_loss.legend()
    ax_ppl.set(xlabel="step", ylabel="perplexity", title=f"{title}: validation perplexity", yscale="log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_task_scores(scores: dict[str, float], out: str | os.PathLike, title: str = "evaluation") -> Path:
    """One bar per task (label: task and metric), scores in [0, 1], the value written on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(scores) + 2), 4))
    bars = ax.bar(range(len(scores)), list(scores.values()), color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in scores.values()], padding=2, fontsize=8)
    ax.set_xticks(range(len(scores)), list(scores), fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="score", title=title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def plot_ppo_rollouts(history: list[dict], out: str | os.PathLike) -> Path:
    """PPO: mean reward of each rollout, and the KL to the reference with the (adaptive) KL coefficient."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [h["iteration"] for h in history]
    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    ax_r.plot(it, [h["reward"] for h in history], "o-", color="tab:green")
    ax_r.set(xlabel="PPO iteration (rollout)", ylabel="mean reward-model score", title="reward of rollouts")
    ax_kl.plot(it, [h["kl"] for h in history], "o-", color="tab:red", label="KL(policy || reference)")
    ax_kl.set(xlabel="PPO iteration (rollout)", ylabel="nats per sequence", title="KL to the reference")
    ax_coef = ax_kl.twinx()
    ax_coef.plot(it, [h["kl_coef"] for h in history], "--", color="tab:gray", label="KL coefficient")
    ax_coef.set(ylabel="KL coefficient")
    ax_kl.legend(handles=ax_kl.lines + ax_coef.lines, loc="lower right")
    for ax in (ax_r, ax_kl):
        ax.grid(alpha=0.3)
    return _save(fig, out)


def _save(fig, out: str | os.PathLike) -> Path:
    """Write `fig` as a PNG at `out` (folders created) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
