"""How long a scaling sweep will take here: the loop's real training step timed for each size of a
recipe, times the steps of each of its token budgets.

Each size's step (forward, backward, clipping, AdamW, at the recipe's batch x context and precision)
is timed with the speedrun's calibration (`llmkit.speedrun.seconds_per_step`: two warm-up steps, then
the median of five); a run's time is its steps times that (evaluation and data preparation are not
counted: a few seconds a run, and a few minutes once). The load average is recorded beside it: on a
shared machine the prediction is only as quiet as the machine was.

    python benchmarks/scaling_plan.py                                  # recipes/scaling.yaml
    python benchmarks/scaling_plan.py --recipe recipes/scaling.yaml --threads 2   # two threads instead
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from provenance import cpu_name
from tqdm import tqdm

from llmkit.model import Transformer
from llmkit.options import build_config
from llmkit.speedrun import SpeedrunConfig, seconds_per_step
from llmkit.train.sweep import SweepConfig, size_config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "scaling_plan.json"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "scaling.yaml"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the recipe's, else torch's own)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    config = build_config(SweepConfig, args.recipe)
    if args.threads or config.threads:
        torch.set_num_threads(args.threads or config.threads)
    per_step = config.batch_size * config.context
    timing = SpeedrunConfig(batch_size=config.batch_size, context=config.context, compile=False,
                            optimizer="adamw")  # the sweep trains with AdamW
    load_before = os.getloadavg()
    sizes = {}
    for size in tqdm(config.sizes, desc="timing sizes", unit="size"):
        model = Transformer(size_config(size, config.vocab_size, config.context))
        s = seconds_per_step(model, timing, (config.precision,))[config.precision]
        runs = {str(t): round(math.ceil(t / per_step) * s, 1) for t in sorted(config.tokens)}
        sizes[size] = {"non_embedding_parameters": model.num_parameters(exclude_embeddings=True),
                       "flops_per_token": model.flops_per_token(config.context), "seconds_per_step": round(s, 4),
                       "tokens_per_s": round(per_step / s), "gflops_per_s": round(model.flops_per_token(
                           config.context) * per_step / s / 1e9, 2), "run_seconds": runs}
    total = sum(sum(v["run_seconds"].values()) for v in sizes.values())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout.split("\n")
    report = {
        "benchmark": "scaling_plan", "recipe": os.path.relpath(args.recipe, ROOT), "commit": commit,
        "uncommitted": [line for line in dirty if line.strip()],
        "command": " ".join(["python benchmarks/scaling_plan.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_average_1_5_15": {"before": load_before,
                                                                        "after": os.getloadavg()}},
        "tokens_per_step": per_step, "precision": config.precision, "sizes": sizes,
        "predicted_training_hours": round(total / 3600, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for size, v in sizes.items():
        print(f"{size:>8}: N={v['non_embedding_parameters']:>9,}  {v['seconds_per_step']:.3f} s/step  "
              f"{v['tokens_per_s']:>6} tokens/s  {v['gflops_per_s']:5.1f} GFLOP/s")
    print(f"predicted training time of the sweep: {total / 3600:.2f} h (load average before: {load_before})")
    return report


if __name__ == "__main__":
    main()
