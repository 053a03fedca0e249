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


def plot_compared_runs(runs: dict[str, str | os.PathLike | list[dict]], out: str | os.PathLike,
                       title: str = "runs compared") -> Path:
    """Several runs' held-out curves over tokens seen: bits per byte where logged (else loss), and the
    training loss (smoothed), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(11, 4))
    ylabel = "validation loss (nats/token)"
    for name, metrics in runs.items():
        records = read_metrics(metrics) if not isinstance(metrics, list) else metrics
        tokens = {r["step"]: r["tokens_seen"] for r in records if "tokens_seen" in r}
        val = [r for r in records if "val_loss" in r]
        key = "val_bpb" if val and all("val_bpb" in r for r in val) else "val_loss"
        ylabel = "validation bits per byte" if key == "val_bpb" else ylabel
        ax_val.plot([tokens.get(r["step"], 0) for r in val], [r[key] for r in val], "o-", label=name)
        train = [(tokens.get(r["step"], 0), r.get("lm_loss", r["loss"])) for r in records if "loss" in r]
        if train:
            window = max(1, len(train) // 25)
            xs = [x for x, _ in train][window - 1:]
            ys = [sum(y for _, y in train[i - window + 1:i + 1]) / window for i in range(window - 1, len(train))]
            ax_train.plot(xs, ys, label=name)
    ax_val.set(xlabel="tokens seen", ylabel=ylabel, title=f"{title}: held-out")
    ax_train.set(xlabel="tokens seen", ylabel="training LM loss (smoothed)", title=f"{title}: training")
    for ax in (ax_val, ax_train):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out)


def expert_loads(records: list[dict]) -> tuple[list[int], dict[int, list[list[float]]]]:
    """The `expert_load.<layer>.<expert>` shares of each training record: (steps, {layer: [per step:
    [share of each expert]]}); empty for a dense run."""
    keys = sorted({k for r in records for k in r if k.startswith("expert_load.")},
                  key=lambda k: tuple(int(p) for p in k.split(".")[1:]))
    rows = [r for r in records if keys and keys[0] in r]
    layers: dict[int, list[str]] = {}
    for k in keys:
        layers.setdefault(int(k.split(".")[1]), []).append(k)
    return [r["step"] for r in rows], {layer: [[r[k] for k in ks] for r in rows] for layer, ks in layers.items()}


def expert_load_band(records: list[dict], last: float = 0.2) -> dict[str, float]:
    """Loads as multiples of the even share (1.0) over the last `last` fraction of the logged steps.

    min_load / max_load: each expert's share averaged over those steps, the smallest and largest over
    all layers and experts: whether an expert collapsed (near 0) or took over (near n_experts /
    experts_per_token) for good. step_min_load / step_max_load: the idlest and busiest expert of one
    layer in one step, averaged over layers and steps: a router that sends every token of a batch to
    the same experts but changes them from step to step looks even on average and shows here."""
    steps, layers = expert_loads(records)
    if not steps:
        return {}
    start = int(len(steps) * (1 - last))
    fair, step_min, step_max = [], [], []
    for per_step in layers.values():
        tail = per_step[start:]
        n = len(tail[0])
        fair += [n * sum(s[e] for s in tail) / len(tail) for e in range(n)]
        step_min += [n * min(s) for s in tail]
        step_max += [n * max(s) for s in tail]
    return {"min_load": min(fair), "max_load": max(fair), "step_min_load": sum(step_min) / len(step_min),
            "step_max_load": sum(step_max) / len(step_max), "steps_averaged": len(steps) - start}


def plot_expert_load(metrics: str | os.PathLike | list[dict], out: str | os.PathLike, title: str = "training") -> Path:
    """One panel per MoE layer: each expert's share of the routed tokens over training (smoothed), with
    the even share 1 / n_experts dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics) if not isinstance(metrics, list) else metrics
    steps, layers = expert_loads(records)
    if not steps:
        raise ValueError("no expert_load.<layer>.<expert> metrics in these records (not a mixture-of-experts run)")
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1, 3.0 * rows), squeeze=False, sharey=True)
    window = max(1, len(steps) // 25)
    for ax, (layer, per_step) in zip(axes.flat, layers.items(), strict=False):
        n = len(per_step[0])
        for e in range(n):
            share = [s[e] for s in per_step]
            smooth = [sum(share[max(0, i - window + 1):i + 1]) / len(share[max(0, i - window + 1):i + 1])
                      for i in range(len(share))]
            ax.plot(steps, smooth, linewidth=1, label=f"expert {e}")
        ax.axhline(1 / n, color="black", linestyle="--", linewidth=0.8)
        ax.set(title=f"layer {layer}", xlabel="step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    axes[0, 0].set_ylabel(f"token share ({window}-step mean)")
    axes[0, -1].legend(fontsize=6, ncol=4, loc="upper right", framealpha=0.8)
    fig.suptitle(f"{title}: expert utilisation (dashed: even share)")
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

    from llmkit.analysis.scaling import Chinchilla, PowerLaw, frontier, total_parameters

    N, D, C, loss = (np.array([float(r[k]) for r in rows]) for k in ("N", "D", "C", "val_loss"))
    N_total = total_parameters(rows)  # Chinchilla's N
    fits = result["fits"]
    chin = Chinchilla(**fits["L(N,D)"]) if fits.get("L(N,D)") else None
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    ax_n, ax_d, ax_c, ax_opt = axes.ravel()
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(np.unique(D))))
    for colour, d in zip(colours, np.unique(D), strict=True):
        at = np.flatnonzero(D == d)
        at = at[np.argsort(N[at])]
        ax_n.plot(N[at], loss[at], "o", color=colour, label=f"D = {d:.3g}")
        if chin:  # L(N, D) at each size's total parameters, drawn at its non-embedding N
            ax_n.plot(N[at], chin(N_total[at], d), "-", color=colour, alpha=0.6)
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
        C_total = 6 * N_total * D
        budgets = np.geomspace(C_total.min() / 3, C_total.max() * 30, 50)
        opt = [chin.compute_optimal(c) for c in budgets]
        ax_opt.plot(budgets, [o["N"] for o in opt], label="N_opt (parameters)")
        ax_opt.plot(budgets, [o["D"] for o in opt], label="D_opt (tokens)")
        ax_opt.plot(budgets, [20 * np.sqrt(c / 120) for c in budgets], ":", color="tab:gray",
                    label="D = 20 N (Chinchilla's rule)")
        ax_opt.plot(C_total, D, "o", color="tab:gray", alpha=0.4, label="the sweep's runs (D)")
        ax_opt.set(xscale="log", yscale="log", xlabel="C = 6·N·D, all parameters (FLOPs)", ylabel="count",
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
