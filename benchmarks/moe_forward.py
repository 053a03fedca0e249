"""MoE forward throughput on CPU: llmkit's Transformer vs transformers' MixtralForCausalLM, same weights.

The speedrun's MoE preset (`mixtral-2m`: 8 experts, 2 per token) at the speedrun's batch, inference
(no grad, fp32, eval), one process. transformers runs with the experts implementation it picks by
default and, as a second reference, its per-expert loop (`experts_implementation="eager"`). The
systems take turns in many short rounds so a noisy neighbour slows them alike; tokens/s come from
each one's median forward and, as the estimate a busy machine moves least, from its fastest. Prints
and writes benchmarks/results/moe_forward.json with the command, the commit (and uncommitted
files), the CPU as /proc/cpuinfo names it and the date.

    python benchmarks/moe_forward.py
    python benchmarks/moe_forward.py --batch 1 --seq 64 --out benchmarks/results/moe_forward_b1.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmkit import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parent.parent


def provenance(argv: list[str] | None, script: str) -> dict:
    """What reproduces a result: the command, the commit and uncommitted files, the machine, the date."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout  # noqa: E731
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else \
        platform.machine()
    return {"command": " ".join([f"python {script}", *(sys.argv[1:] if argv is None else argv)]),
            "commit": git("rev-parse", "HEAD").strip(),
            "uncommitted_changes": [line[3:] for line in git("status", "--porcelain", "--untracked-files=no")
                                    .splitlines() if line.strip()],
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__},
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def timed(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mixtral-2m")
    p.add_argument("--vocab-size", type=int, default=4096, help="the speedrun's vocabulary; 0 keeps the preset's")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="forwards of each system per round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/moe_forward.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import MixtralForCausalLM
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = ModelConfig.from_preset(args.preset, **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    systems = {"llmkit": lambda x: ours(x)}
    implementations = {}
    with tempfile.TemporaryDirectory() as d:  # the same weights in both, through the checkpoint
        ours.save_pretrained(d)
        for name, impl in (("transformers", None), ("transformers_eager_experts", "eager")):
            kwargs = {"experts_implementation": impl} if impl else {}
            model = MixtralForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa",
                                                       **kwargs).eval()
            implementations[name] = model.config._experts_implementation
            systems[name] = lambda x, m=model: m(x).logits
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = systems["transformers"](x)
        max_diff = {name: float((fn(x) - reference).abs().max()) for name, fn in systems.items()}
        for fn in systems.values():
            timed(lambda fn=fn: fn(x), args.warmup)
        times = {name: [] for name in systems}
        for _ in range(args.rounds):
            for name, fn in systems.items():
                times[name] += timed(lambda fn=fn: fn(x), args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    report = {
        "benchmark": "moe_forward_tokens_per_s", "preset": args.preset, "vocab_size": config.vocab_size,
        "n_experts": config.n_experts, "experts_per_token": config.experts_per_token, "batch": args.batch,
        "seq": args.seq, "threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps,
        "transformers_experts_implementation": implementations,
        "tokens_per_s": {name: round(x.numel() / m, 1) for name, m in median.items()},
        "ratio_llmkit_vs": {name: round(m / median["llmkit"], 3) for name, m in median.items() if name != "llmkit"},
        # contention only adds time: the fastest forward of each is the estimate least moved by a busy machine
        "tokens_per_s_fastest": {name: round(x.numel() / min(t), 1) for name, t in times.items()},
        "ratio_llmkit_vs_fastest": {name: round(min(t) / min(times["llmkit"]), 3) for name, t in times.items()
                                    if name != "llmkit"},
        "forward_seconds_min_max": {name: [round(min(t), 4), round(max(t), 4)] for name, t in times.items()},
        "max_abs_logit_diff_vs_transformers": max_diff,
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        **provenance(argv, "benchmarks/moe_forward.py"),
        "notes": "fp32 inference forward (logits of every position); tokens/s from each system's median "
                 "forward over all rounds; the systems take turns each round",
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
