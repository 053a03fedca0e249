"""How fast a training step could be: the floor that matmuls and attention set, against both steps.

`benchmarks/train.py` compares llmkit's step with transformers'. This script says how much of that
gap is left to close: the weight matmuls of one step (6 FLOPs per weight per token: forward, and
the two products of the backward) at the machine's best measured matmul rate, plus the fused
attention's forward and backward (PyTorch's flash kernel, which both steps call) at the model's
shapes. No step that runs these kernels can be faster than their sum, so transformers' step over
it bounds the speedup any step made of the same kernels can reach against transformers.

    python benchmarks/train_floor.py       # the speedrun's model and batch, fp32, 2 threads

Writes benchmarks/results/train_floor.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import provenance
from train import both_models, make_step, timed

from llmkit import ModelConfig
from llmkit.speedrun import SpeedrunConfig


def median_seconds(fn, n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, n))


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` n x n x n fp32 matmuls: the rate a well-shaped GEMM reaches here."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = min(timed(lambda: a @ b, repeats))
    return 2 * n ** 3 / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run = SpeedrunConfig()
    p.add_argument("--preset", default=run.model)
    p.add_argument("--vocab-size", type=int, default=run.vocab_size)
    p.add_argument("--batch", type=int, default=run.batch_size)
    p.add_argument("--seq", type=int, default=run.context)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="timed steps of each system")
    p.add_argument("--out", default="benchmarks/results/train_floor.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = ModelConfig.from_preset(args.preset, vocab_size=args.vocab_size)
    ours, theirs = both_models(config)
    tokens = args.batch * args.seq
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)

    # the weight matmuls: every Linear (the LM head too, tied or not), 6 FLOPs per weight per token
    weights = sum(m.weight.numel() for m in ours.modules() if isinstance(m, torch.nn.Linear))
    matmul_flops = 6 * weights * tokens
    peak = matmul_peak()

    c = config
    q = torch.randn(args.batch, c.n_head, args.seq, c.head_dim, requires_grad=True)
    k, v = (torch.randn(args.batch, c.n_kv_head, args.seq, c.head_dim, requires_grad=True) for _ in range(2))
    grad = torch.randn_like(q)

    def attention() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.n_kv_head != c.n_head).backward(grad)

    attention_s = c.n_layer * median_seconds(attention, args.steps)
    floor = matmul_flops / peak + attention_s

    steps = {"transformers": make_step(theirs, x, y, True, None), "llmkit": make_step(ours, x, y, False, None)}
    times = {name: [] for name in steps}
    for step in steps.values():
        timed(step, 3)
    for _ in range(args.steps // 2):  # in turns, two steps each
        for name, step in steps.items():
            times[name] += timed(step, 2)
    step_s = {name: statistics.median(t) for name, t in times.items()}
    report = {
        "benchmark": "train_floor", "preset": args.preset, "vocab_size": config.vocab_size, "batch": args.batch,
        "seq": args.seq, "precision": "fp32", "threads": args.threads,
        "matmul_weights": weights, "matmul_gflop_per_step": round(matmul_flops / 1e9, 2),
        "matmul_peak_gflop_per_s": round(peak / 1e9, 1),
        "floor_seconds": {"matmuls_at_peak": round(matmul_flops / peak, 4), "attention": round(attention_s, 4),
                          "total": round(floor, 4)},
        "step_seconds": {name: round(s, 4) for name, s in step_s.items()},
        "llmkit_vs_transformers": round(step_s["transformers"] / step_s["llmkit"], 3),
        "ceiling_vs_transformers": round(step_s["transformers"] / floor, 3),
        "llmkit_over_floor": round(step_s["llmkit"] / floor, 3),
        "notes": "floor = the step's weight matmuls at the best n=2048 fp32 GEMM rate + flash attention forward and "
                 "backward at the model's shapes (n_layer times); ceiling = transformers' step / floor: the most a "
                 "step made of these kernels can gain on transformers' with everything else free",
        **provenance("benchmarks/train_floor.py"),
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
