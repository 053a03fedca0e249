"""The speedrun's techniques one at a time against its default, at the same 10-minute budget.

Each arm is `llmkit speedrun` (the whole main job: data, tokenizer, calibration, training, report) with
one change (see ARMS); the table reads each run's report.json: validation bits per byte on the same
held-out text, tokens seen, training tokens/s. On 2 cores the arms run two at a time, one torch thread
each (`--parallel 2 --threads 1`, the default), so every arm has the same machine: the table compares
the arms with each other; `make demo` (two threads, one run) is the speedrun's own figure. Precision is
fp32 in every arm, so that the calibration's choice between fp32 and bf16 does not differ between arms.

    python benchmarks/speedrun_ablation.py                     # every arm -> results/speedrun_ablation.json
    python benchmarks/speedrun_ablation.py --arms muon,wsd      # some arms (finished ones are kept)
    python benchmarks/speedrun_ablation.py --render             # the table into docs/speedrun.md

In make demo's own regime (one arm at a time on both threads, bf16 as the calibration picks on a CPU with
avx512_bf16), into a result file and table of its own:

    python benchmarks/speedrun_ablation.py --parallel 1 --threads 2 --precision bf16 --runs runs/ablation-demo \
        --out benchmarks/results/speedrun_ablation_demo.json --arms '' --combine all=muon+wsd+value-residual+untied+qk-norm ...

A run whose report.json exists is not redone (delete runs/ablation/NAME to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "speedrun_ablation.json"
DOC = ROOT / "docs" / "speedrun.md"


def markers(out: Path) -> tuple[str, str]:
    """The comments around a result file's table in docs/speedrun.md (the default file's, or one named by its stem)."""
    tag = "ablation table" if out.resolve() == RESULT else f"ablation table {out.stem}"
    return f"<!-- {tag}: begin -->", f"<!-- {tag}: end -->"

# Every arm starts from the speedrun as it was before this ablation (its recipe, with these flags), so that the
# table reproduces now that the recipe's defaults are the ablation's best.
BASELINE = ["--optimizer", "adamw", "--schedule", "cosine", "--model-options", "", "--seq-warmup", "0"]
# arm -> (what it changes, speedrun flags after BASELINE)
ARMS = {
    "default": ("the speedrun before the ablation (AdamW, cosine, plain llama-2m)", []),
    "muon": ("Muon on the blocks' matrices (lr 0.02), AdamW on the rest", ["--optimizer", "muon"]),
    "qk-norm": ("RMSNorm on queries and keys", ["--model-options", "qk_norm=true"]),
    "relu2": ("ReLU^2 in the gated MLP instead of SiLU", ["--model-options", "activation=relu2"]),
    "untied": ("an LM head of its own (untied from the embedding)", ["--model-options", "tie_embeddings=false"]),
    "softcap": ("logits soft-capped at 15", ["--model-options", "logit_softcap=15"]),
    "value-residual": ("value residual: layers mix in layer 0's values", ["--model-options", "value_residual=true"]),
    "wsd": ("warmup-stable-decay schedule (last 20 % decays)", ["--schedule", "wsd"]),
    "unet": ("U-net skips: the last half's layers add the first half's outputs (learned weights)",
             ["--model-options", "unet_skips=true"]),
    "seq-warmup": ("sequence length 64 doubling to 256 over the first 30 % (the same tokens per step)",
                   ["--seq-warmup", "0.3", "--seq-start", "64"]),
    "batch-warmup": ("rows per step from 25 % of the batch growing to all over the first 30 %",
                     ["--batch-warmup", "0.3", "--batch-start", "0.25"]),
    # not arms of their own (see --combine): a knob of one of the above
    "muon-lr-0.04": ("Muon at lr 0.04", ["--optimizer", "muon", "--muon-lr", "0.04"]),
    "llama-4m": ("llama-4m (3.1M parameters) instead of llama-2m (1.3M)", ["--model", "llama-4m"]),
    "seed-2": ("seed 2 instead of the recipe's 1337 (initialisation and data order)", ["--seed", "2"]),
}
DEFAULT_ARMS = ("default", "muon", "qk-norm", "relu2", "untied", "softcap", "value-residual", "wsd", "unet",
                "seq-warmup", "batch-warmup")


def run_arm(name: str, flags: list[str], budget: float, threads: int, runs: Path, precision: str) -> dict:
    report = runs / name / "report.json"
    if not report.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        log = runs / f"{name}.log"
        runs.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "llmkit", "speedrun", "--config", str(ROOT / "recipes" / "speedrun.yaml"),
                   "--name", name, "--runs-dir", str(runs), "--budget-minutes", str(budget), "--precision", precision,
                   *BASELINE, *flags]
        started = time.perf_counter()
        with open(log, "w") as out:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"arm {name} failed ({done.returncode}); see {log}")
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    r = json.loads(report.read_text())
    t, f = r["training"], r["final"]
    return {"val_bpb": f["val_bpb"], "val_loss": f["val_loss"], "tokens_seen": t["tokens_seen"], "steps": t["steps"],
            "stopped": t["stopped"], "tokens_per_s": t["tokens_per_s"], "run": os.path.relpath(report.parent, ROOT)}


def render(result: dict) -> str:
    # the arms are compared with `default` (the speedrun before the ablation), else with the file's first arm
    reference = "default" if "default" in result["arms"] else next(iter(result["arms"]))
    base = result["arms"][reference]["val_bpb"]
    runs = list(dict.fromkeys((row["command"], row["commit"][:7]) for row in result["arms"].values()))
    arms, threads = result["arms_at_once"], result["threads_per_arm"]
    lines = [f"{result['machine']['cpu']}, {arms} arm{'s' * (arms != 1)} at a time, {threads} torch "
             f"thread{'s' * (threads != 1)} each, {result['budget_minutes']}-minute budget, {result['precision']}; measured by "
             + "; then ".join(f"`{command}` (commit {commit})" for command, commit in runs) + ":", "",
             f"| arm | change | val bits/byte | vs {reference} | tokens seen | tokens/s | steps |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, row in result["arms"].items():
        delta = f"{row['val_bpb'] - base:+.3f}" if name != reference else ""
        lines.append(f"| {name} | {ARMS.get(name, (result.get('combined', {}).get(name, ''),))[0]} | "
                     f"{row['val_bpb']:.3f} | {delta} | {row['tokens_seen']:,} | {row['tokens_per_s']:,.0f} | "
                     f"{row['steps']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="comma-separated arms (default: the techniques "
                                                                         "one at a time and the default)")
    parser.add_argument("--combine", action="append", default=[],
                        help="NAME=ARM+ARM+...: also run these arms' changes together (repeatable)")
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--parallel", type=int, default=2, help="arms at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    parser.add_argument("--precision", default="fp32", help="every arm's (auto: the speedrun's own choice, "
                                                              "as make demo makes it)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "ablation"))
    parser.add_argument("--out", default=str(RESULT), help="the result file")
    parser.add_argument("--render", action="store_true", help="only write the table into docs/speedrun.md")
    args = parser.parse_args()
    if args.render:
        result = json.loads(Path(args.out).read_text())
        text = DOC.read_text()
        BEGIN, END = markers(Path(args.out))
        if BEGIN not in text:
            raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block")
        head, rest = text.split(BEGIN, 1)
        DOC.write_text(head + BEGIN + "\n" + render(result) + "\n" + END + rest.split(END, 1)[1])
        print(f"wrote the table into {DOC}")
        return
    arms = {a: ARMS[a][1] for a in args.arms.split(",") if a}
    combined = {}
    for spec in args.combine:
        name, parts = spec.split("=", 1)
        options = [ARMS[p][1] for p in parts.split("+")]
        flags, model_options = [], []
        for f in options:
            for key, value in zip(f[::2], f[1::2], strict=True):
                (model_options.append(value) if key == "--model-options" else flags.extend([key, value]))
        arms[name] = flags + (["--model-options", ",".join(model_options)] if model_options else [])
        combined[name] = " + ".join(parts.split("+"))
    runs = Path(args.runs)
    started = provenance("benchmarks/speedrun_ablation.py")  # the code the arms run is the code at the start
    out = Path(args.out)
    earlier = json.loads(out.read_text())["arms"] if out.is_file() else {}
    ran_before = {name for name in arms if (runs / name / "report.json").is_file()}
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {name: pool.submit(run_arm, name, flags, args.budget_minutes, args.threads, runs, args.precision)
                   for name, flags in arms.items()}
        rows = {name: {**f.result(), "command": started["command"], "commit": started["commit"]}
                for name, f in futures.items()}
    for name in ran_before & set(earlier):  # a run that was not redone keeps the record of the one that ran it
        rows[name].update(command=earlier[name]["command"], commit=earlier[name]["commit"])
    result = {"benchmark": "speedrun_ablation", **started,
              "budget_minutes": args.budget_minutes, "arms_at_once": args.parallel, "threads_per_arm": args.threads,
              "precision": args.precision, "flags": arms, "combined": combined, "arms": {**earlier, **rows}}
    result["combined"] = {**(json.loads(out.read_text()).get("combined", {}) if out.is_file() else {}), **combined}
    result["flags"] = {**(json.loads(out.read_text()).get("flags", {}) if out.is_file() else {}), **arms}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
