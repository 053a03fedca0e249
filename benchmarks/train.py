"""Training throughput: llmkit's Transformer vs transformers' LlamaForCausalLM, side by side.

Same config, same weights, same batch, same precision, same optimizer (AdamW, fused, as llmkit's
loop builds it), one process: forward + cross-entropy + backward + clip + step. Each system runs
the step the way its users run it: transformers returns logits and the loss is `F.cross_entropy`
on them; llmkit's objective asks the model for the loss (`model(x, labels=y)`), which it computes
from the hidden states without materialising the logits. The systems take turns in many short
rounds so that the noise of a shared machine hits them alike; tokens/s come from the median step.
Prints JSON (tokens/s of each and the ratio) and writes benchmarks/results/train.json.

The model is the speedrun's preset in its plain shape: the speedrun's default options (value residual,
QK-norm on a Llama) have no transformers counterpart to compare with.

    python benchmarks/train.py              # the speedrun's model and batch: fp32 and bf16, eager and compiled
    python benchmarks/train.py --preset llama-8m --vocab-size 0 --batch 8 --out benchmarks/results/train_llama-8m.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import provenance

from llmkit import ModelConfig, Transformer
from llmkit.speedrun import SpeedrunConfig
from llmkit.train.objectives import causal_lm_loss
from llmkit.train.optimizers import adamw


def make_step(model, x, y, hf: bool, amp: torch.dtype | None):
    optimizer = adamw(model, lr=1e-4, weight_decay=0.1)  # the loop's, for both

    def step() -> float:
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            if hf:
                loss = F.cross_entropy(model(x).logits.float().flatten(0, 1), y.flatten())
            else:
                loss, _ = causal_lm_loss(model, (x, y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def both_models(config: ModelConfig):
    """llmkit's Transformer and transformers' LlamaForCausalLM with the same random weights (through a checkpoint)."""
    import tempfile

    from transformers import LlamaForCausalLM
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    ours = Transformer(config).train()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").train()
    return ours, theirs


def timed(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run = SpeedrunConfig()  # by default the main job's model and batch: what `make demo` trains
    p.add_argument("--preset", default=run.model)
    p.add_argument("--vocab-size", type=int, default=run.vocab_size, help="0 keeps the preset's vocabulary")
    p.add_argument("--batch", type=int, default=run.batch_size)
    p.add_argument("--seq", type=int, default=run.context)
    p.add_argument("--steps", type=int, default=4, help="steps of each system per round")
    p.add_argument("--rounds", type=int, default=8, help="rounds in which the systems take turns")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure llmkit under torch.compile (the loop's `compile: true`)")
    p.add_argument("--out", default="benchmarks/results/train.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = ModelConfig.from_preset(args.preset, **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
    ours, theirs = both_models(config)
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    compiled = torch.compile(ours) if args.compile else None

    results, ratios, spread = {}, {}, {}
    for precision in args.precisions.split(","):
        amp = {"fp32": None, "bf16": torch.bfloat16}[precision]
        steps = {"transformers": make_step(theirs, x, y, True, amp), "llmkit": make_step(ours, x, y, False, amp)}
        if compiled is not None:
            steps["llmkit_compiled"] = make_step(compiled, x, y, False, amp)
        for step in steps.values():  # warm-up (compiles the compiled one)
            timed(step, args.warmup)
        times = {name: [] for name in steps}
        for _ in range(args.rounds):  # take turns, so a noisy neighbour slows them alike
            for name, step in steps.items():
                times[name] += timed(step, args.steps)
        median = {name: statistics.median(t) for name, t in times.items()}
        results[precision] = {name: round(x.numel() / m, 1) for name, m in median.items()}
        ratios[precision] = {name: round(median["transformers"] / m, 3) for name, m in median.items()
                             if name != "transformers"}
        spread[precision] = {name: [round(min(t), 3), round(max(t), 3)] for name, t in times.items()}
        print(precision, results[precision], ratios[precision], flush=True)
    report = {
        "benchmark": "train_tokens_per_s", "preset": args.preset, "vocab_size": config.vocab_size, "batch": args.batch, "seq": args.seq,
        "threads": args.threads, "steps_per_round": args.steps, "rounds": args.rounds, "parameters": ours.num_parameters(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "tokens_per_s": results, "ratio_vs_transformers": ratios, "step_seconds_min_max": spread,
        "notes": "tokens/s from the median step over all rounds; the systems take turns each round; "
                 "compiled runs after a warm-up that compiles them",
        **provenance("benchmarks/train.py"),  # last: its machine (the CPU model) replaces the one above
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
