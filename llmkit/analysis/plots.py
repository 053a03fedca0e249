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


def plot_scaling(rows: list[dict], result: dict, out: str | os.PathLike) -> Path:
    """A sweep and its fits: loss against N (one colour per token budget, Chinchilla's curves through
    them), against D, against C (the compute frontier and its power law), and the compute-optimal N
    and D that the fitted L(N, D) gives for each budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from llmkit.analysis.scaling import Chinchilla, PowerLaw, frontier

    N, D, C, loss = (np.array([float(r[k]) for r in rows]) for k in ("N", "D", "C", "val_loss"))
    fits = result["fits"]
    chin = Chinchilla(**fits["L(N,D)"]) if fits.get("L(N,D)") else None
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    ax_n, ax_d, ax_c, ax_opt = axes.ravel()
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(np.unique(D))))
    n_line = np.geomspace(N.min() / 1.5, N.max() * 1.5, 100)
    for colour, d in zip(colours, np.unique(D), strict=True):
        at = D == d
        ax_n.plot(N[at], loss[at], "o", color=colour, label=f"D = {d:.3g}")
        if chin:
            ax_n.plot(n_line, chin(n_line, d), "-", color=colour, alpha=0.6)
    for name, ax, x, label in (("L(N)", ax_n, N, "N (non-embedding parameters)"), ("L(D)", ax_d, D, "D (tokens)"),
                               ("L(C)", ax_c, C, "C = 6ND (FLOPs)")):
        if ax is not ax_n:
            ax.plot(x, loss, "o", color="tab:gray", alpha=0.6, label="runs")
        if fits.get(name):
            law = PowerLaw(**fits[name])
            line = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
            ax.plot(line, law(line), "--", color="black", label=f"{name}: α = {law.alpha:.3f}")
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="validation loss (nats/token)")
    edge = frontier(C, loss)
    ax_c.plot(C[edge], loss[edge], "s", color="tab:red", label="compute frontier")
    if chin:
        budgets = np.geomspace(C.min() / 3, C.max() * 30, 50)
        opt = [chin.compute_optimal(c) for c in budgets]
        ax_opt.plot(budgets, [o["N"] for o in opt], label="N_opt (parameters)")
        ax_opt.plot(budgets, [o["D"] for o in opt], label="D_opt (tokens)")
        ax_opt.plot(budgets, [20 * np.sqrt(c / 120) for c in budgets], ":", color="tab:gray",
                    label="D = 20 N (Chinchilla's rule)")
        ax_opt.plot(C, D, "o", color="tab:gray", alpha=0.4, label="the sweep's runs (D)")
        ax_opt.set(xscale="log", yscale="log", xlabel="C (FLOPs)", ylabel="count",
                   title=f"compute-optimal: α = {chin.alpha:.3f}, β = {chin.beta:.3f}")
    else:
        ax_opt.text(0.5, 0.5, "L(N, D) needs at least 5 runs", ha="center", va="center", transform=ax_opt.transAxes)
    ax_n.set_title("loss against parameters")
    ax_d.set_title("loss against tokens")
    ax_c.set_title("loss against compute")
    for ax in axes.ravel():
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, out)
