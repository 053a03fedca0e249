"""Perplexity of SmolLM2-135M-Instruct (trained at 8,192 tokens) beyond its context, by RoPE scaling.

One window of N tokens from the start of one long document (tinyshakespeare, 1.1 MB, ~300k tokens)
is scored in one fp32 forward under torch.no_grad for each N and each way of reaching it:
unscaled RoPE (extrapolation), linear position interpolation, dynamic NTK and YaRN, all with
factor 4 over the trained 8,192 positions (transformers' formulas, llmkit/rope.py). Reported: the
perplexity of the whole window and of the tokens past position 8,192 alone, both from the fused
chunked loss (`llmkit.losses.linear_cross_entropy` over the final hidden states, which is what
`model(ids, labels=...)` computes: no logits are materialised).

    python benchmarks/long_context.py                         # 8k, 16k and 32k
    python benchmarks/long_context.py --lengths 8192 16384    # the cheaper points first

Each point is merged into benchmarks/results/long_context.json as it finishes (a later run computes
only the missing points; --redo all of them), and docs/long_context.png is redrawn from that file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "long_context.json"
PNG = ROOT / "docs" / "long_context.png"
METHODS = ("none", "linear", "dynamic", "yarn")


def scaling_of(method: str, factor: float, original: int) -> dict | None:
    """The rope_scaling dict of each method (transformers' form); yarn with its default betas 32/1."""
    if method == "none":
        return None
    return {"rope_type": method, "factor": factor, "original_max_position_embeddings": original}


def perplexities(model, ids: torch.Tensor, original: int) -> dict:
    """Perplexity of every next-token prediction in `ids` (1, N+1), and of those past `original`."""
    from llmkit.data.collate import IGNORE_INDEX
    from llmkit.losses import linear_cross_entropy

    inputs, labels = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        hidden = model.hidden_states(inputs)
        whole = linear_cross_entropy(hidden, model.lm_head.weight, labels)
        beyond = labels.clone()
        beyond[:, :original] = IGNORE_INDEX  # targets at positions >= original (the context it never saw)
        late = linear_cross_entropy(hidden, model.lm_head.weight, beyond) if labels.shape[1] > original else None
    return {"ppl": round(math.exp(whole.item()), 4),
            "ppl_beyond_original": None if late is None else round(math.exp(late.item()), 4)}


def plot(report: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmkit.analysis.plots import _save

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        points = sorted((int(n), r[method]) for n, r in report["results"].items() if method in r)
        for ax, key in zip(axes, ("ppl", "ppl_beyond_original"), strict=True):
            xy = [(n, p[key]) for n, p in points if p.get(key) is not None]
            if xy:
                ax.plot(*zip(*xy, strict=True), marker="o", label=method)
    original = report["settings"]["original_max_position_embeddings"]
    for ax, title in zip(axes, ("whole window", f"tokens past position {original:,}"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("window (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(title)
        ax.axvline(original, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"{report['model']} on {report['document'].split(' (')[0]}: RoPE scaling, factor "
                 f"{report['settings']['factor']:g}", fontsize=10)
    return _save(fig, out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--source", default="tinyshakespeare", help="a packaged corpus (llmkit.data.sources)")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--factor", type=float, default=4.0)
    p.add_argument("--original", type=int, default=8192, help="the trained context")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--png", type=Path, default=PNG)
    p.add_argument("--redo", action="store_true", help="recompute the points already in --out")
    args = p.parse_args(argv)

    from llmkit.data import sources
    from llmkit.files import atomic_write_json
    from llmkit.formats import named
    from llmkit.model import Transformer

    config, tensors, tokenizer = named.read(args.model)
    files = sorted(f for f in sources.fetch(args.source).rglob("*") if f.is_file())
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    ids = torch.tensor([tokenizer.encode(text)])
    if ids.shape[1] <= max(args.lengths):
        raise SystemExit(f"{args.source} has {ids.shape[1]} tokens; the longest window needs {max(args.lengths) + 1}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report.update({
        "benchmark": "long_context", "model": args.model, "document": f"{args.source} ({ids.shape[1]:,} tokens; "
        f"each window starts at its first token)",
        "commands": sorted({*report.get("commands", []), " ".join(["python benchmarks/long_context.py",
                                                                    *(sys.argv[1:] if argv is None else argv)])}),
        "commit": commit, "dtype": "float32",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {"factor": args.factor, "original_max_position_embeddings": args.original,
                     "rope_theta": config.rope_theta, "yarn": "beta_fast 32, beta_slow 1, attention factor "
                     "0.1 ln(factor) + 1 (transformers' defaults)",
                     "scaling": {m: scaling_of(m, args.factor, args.original) for m in METHODS}},
    })
    report.setdefault("results", {})
    done = report["results"] if not args.redo else {}
    points = [(n, m) for n in sorted(args.lengths) for m in args.methods if m not in done.get(str(n), {})]
    for n, method in tqdm(points, desc="long-context perplexity", unit="forward"):
        scaling = scaling_of(method, args.factor, args.original)
        if method == "dynamic" and n <= args.original and "none" in report["results"].get(str(n), {}):
            # Up to the trained context dynamic NTK is the unscaled RoPE (same frequencies, tested in
            # tests/test_rope.py), so the forward is not repeated.
            report["results"][str(n)][method] = {**report["results"][str(n)]["none"], "seconds": 0.0,
                                                 "note": "equal to none: unscaled up to the trained context"}
            continue
        model = Transformer.from_state_dict(config.replace(max_seq_len=n, rope_scaling=scaling), tensors,
                                            dtype=torch.float32).eval()
        start = time.perf_counter()
        figures = perplexities(model, ids[:, :n + 1], args.original)
        figures["seconds"] = round(time.perf_counter() - start, 1)
        report["results"].setdefault(str(n), {})[method] = figures
        tqdm.write(f"{n:>6} {method:<8} {figures}")
        atomic_write_json(args.out, report)
        plot(report, args.png)
        del model
    return report


if __name__ == "__main__":
    main()
