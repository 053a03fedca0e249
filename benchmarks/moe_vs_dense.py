"""MoE vs dense at equal active parameters, same data, same wall-clock budget: the speedrun's setting.

Arms (each trained from its own seeded initial weights by `llmkit.train.pretrain`, one after the
other, on the same token shards):
- dense: `llama-2m`;
- moe: `mixtral-2m` (8 experts, 2 per token: llama-2m's active parameters plus a router per layer),
  with the load-balancing loss (coefficient 0.01) of each layer's router, averaged (`router_balance:
  layer`, Switch), and the router z-loss (0.001);
- moe-global: the same with transformers' load-balancing loss, which pools every layer's tokens into
  one count (`router_balance: global`);
- moe-no-balance: the load-balancing coefficient 0 (z-loss kept).
Each gets `--minutes` of training (the loop's schedule follows the clock, as in the speedrun); the
result records bits per byte on the held-out shards, tokens/s, tokens seen, and for the MoE arms
each expert's share of the routed tokens over the last 20 % of steps as a multiple of its even
share (the band [min, max]: 0 means an expert collapsed). Needs ~26 quiet minutes on 2 cores:

    python benchmarks/moe_vs_dense.py                       # writes benchmarks/results/moe_vs_dense.json
    python benchmarks/moe_vs_dense.py --docs docs           # also docs/moe_vs_dense.md and its PNGs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_forward import provenance  # noqa: E402

from llmkit import ModelConfig, Transformer  # noqa: E402
from llmkit.analysis.plots import plot_compared_runs  # noqa: E402
from llmkit.data.prepare import PrepareConfig, parse_weights, prepare, read_documents  # noqa: E402
from llmkit.data.shards import read_meta, tokenize_prepared  # noqa: E402
from llmkit.moe import inactive_parameters  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402
from llmkit.train import pretrain  # noqa: E402
from llmkit.train.pretrain import PretrainConfig  # noqa: E402

ARMS = {"dense": ("llama-2m", {}), "moe": ("mixtral-2m", {}),
        "moe-global": ("mixtral-2m", {"router_balance": "global"}),
        "moe-no-balance": ("mixtral-2m", {"router_aux_loss_coef": 0.0})}


def shards(args, work: Path) -> Path:
    """Token shards (with tokenizer/ beside train/ and val/): `--data`, or the speedrun's pipeline."""
    if args.data:
        return Path(args.data)
    out = work / "shards"
    if (out / "train").is_dir() and (out / "tokenizer" / "tokenizer.json").is_file():
        return out
    prepare(parse_weights(args.sources), work / "data", PrepareConfig(seed=args.seed), progress=True)
    texts = [d.text for d in read_documents(work / "data" / "train.jsonl")]
    tokenizer = Tokenizer.train(texts, args.vocab_size, show_progress=False)
    tokenize_prepared(work / "data", tokenizer, out, progress=False)
    tokenizer.save_pretrained(out / "tokenizer")
    return out


def run_arm(name: str, data: Path, work: Path, args) -> dict:
    preset, overrides = ARMS[name]
    vocab = read_meta(data / "train")["vocab_size"]
    config = ModelConfig.from_preset(preset, vocab_size=vocab, **overrides)
    torch.manual_seed(args.seed)  # the same initial weights as `--model <preset>` would draw
    init = work / f"init-{name}"
    model = Transformer(config)
    model.save_pretrained(init)
    active = model.num_parameters() - inactive_parameters(config)
    out = work / name
    shutil.rmtree(out, ignore_errors=True)  # each arm trains afresh: an earlier run's checkpoints would be refused
    result = pretrain.run(PretrainConfig(
        model=str(init), data=str(data), out_dir=str(out), context=args.context, batch_size=args.batch_size,
        max_steps=args.max_steps, max_minutes=args.minutes, lr=args.lr, warmup_steps=args.warmup_steps,
        precision=args.precision, eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=0,
        keep_last=1, seed=args.seed, log_every=10, progress=args.progress))
    history = result.history
    final = next(r for r in reversed(history) if "val_loss" in r)
    speeds = [r["tokens_per_s"] for r in history if "tokens_per_s" in r][1:]  # the first window holds warm-up
    return {"preset": preset, "overrides": overrides, "parameters": model.num_parameters(),
            "active_parameters": active, "steps": result.step, "stopped": result.stopped,
            "tokens_seen": history[-1].get("tokens_seen") or max(r.get("tokens_seen", 0) for r in history),
            "val_loss": final["val_loss"], "val_bpb": final.get("val_bpb"),
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "expert_load": result.report.get("expert_load"), "out_dir": str(out),
            "load_average_at_end": os.getloadavg()[0]}  # other work on the machine slows both arms alike


def markdown(report: dict, pngs: dict[str, str]) -> str:
    arms = report["arms"]
    lines = ["# MoE vs dense at equal active parameters", "",
             f"Same shards, {report['minutes']} minutes of training per arm, one after the other on "
             f"{report['machine']['cpu']} ({report['machine']['cores']} cores); `{report['command']}` at commit "
             f"{report['commit'][:10]}.", "",
             "| arm | preset | parameters (active) | steps | tokens seen | tokens/s | val bits/byte | expert load band "
             "(mean over steps) | one step: idlest / busiest |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for name, a in arms.items():
        band = a["expert_load"]
        load = (f"{band['min_load']:.2f}-{band['max_load']:.2f} x even | {band['step_min_load']:.2f} / "
                f"{band['step_max_load']:.2f} x" if band else "- | -")
        bpb = f"{a['val_bpb']:.4f}" if a["val_bpb"] is not None else f"loss {a['val_loss']:.4f}"
        lines.append(f"| {name} | `{a['preset']}` | {a['parameters']:,} ({a['active_parameters']:,}) | {a['steps']} | "
                     f"{a['tokens_seen']:,} | {a['tokens_per_s'] or 0:,.0f} | {bpb} | {load} |")
    best = min(arms, key=lambda n: arms[n]["val_bpb"] if arms[n]["val_bpb"] is not None else arms[n]["val_loss"])
    lines += ["", f"Lowest held-out bits per byte: **{best}**. Loads are multiples of an expert's even share "
              "over the last 20 % of steps (`llmkit.analysis.plots.expert_load_band`).", ""]
    lines += [f"![{caption}]({file})" for caption, file in pngs.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=6.0, help="training minutes per arm")
    p.add_argument("--max-steps", type=int, default=100_000, help="an upper bound; the budget ends the run")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated of {list(ARMS)}")
    p.add_argument("--sources", default="wikipedia:0.5,bbcnews:0.5")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--data", default="", help="existing token shards (train/, val/, tokenizer/): skips the pipeline")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--work", default="runs/moe_vs_dense")
    p.add_argument("--out", default="benchmarks/results/moe_vs_dense.json")
    p.add_argument("--docs", default="", help="a folder for moe_vs_dense.md and its PNGs (docs/)")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = shards(args, work)
    arms = {name: run_arm(name, data, work, args) for name in args.arms.split(",")}
    report = {"benchmark": "moe_vs_dense", "minutes": args.minutes, "context": args.context,
              "batch_size": args.batch_size, "lr": args.lr, "precision": args.precision,
              "data": str(data), "arms": arms, **provenance(argv, "benchmarks/moe_vs_dense.py")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.docs:
        docs = Path(args.docs)
        pngs = {"validation bits per byte over tokens seen": plot_compared_runs(
            {n: Path(a["out_dir"]) / "metrics.jsonl" for n, a in arms.items()}, docs / "moe_vs_dense.png").name}
        for name, a in arms.items():
            if a["expert_load"]:
                png = shutil.copy(Path(a["out_dir"]) / "expert_load.png", docs / f"moe_vs_dense_{name}_experts.png")
                pngs[f"expert utilisation: {name}"] = Path(png).name
        (docs / "moe_vs_dense.md").write_text(markdown(report, pngs))
    print(json.dumps({n: {k: a[k] for k in ("steps", "tokens_per_s", "val_bpb", "expert_load")}
                      for n, a in arms.items()}, indent=2))
    return report


if __name__ == "__main__":
    main()
