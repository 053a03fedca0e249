"""Training throughput: llmkit's Transformer vs transformers' LlamaForCausalLM, side by side.

Same config, same weights, same batch, same precision, same optimizer (AdamW, fused off), one
process: forward + cross-entropy + backward + clip + step, timed over `--steps` after warmup.
Prints JSON (tokens/s of each and the ratio) and writes benchmarks/results/train.json.

    python benchmarks/train.py --preset llama-8m --batch 8 --seq 256 --steps 10
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmkit import ModelConfig, Transformer


def step_fn(model, optimizer, x, y, hf: bool, amp: torch.dtype | None):
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        logits = model(x).logits if hf else model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def measure(model, x, y, steps: int, warmup: int, hf: bool = False, amp=None) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(warmup):
        step_fn(model, optimizer, x, y, hf, amp)
    start = time.perf_counter()
    for _ in range(steps):
        step_fn(model, optimizer, x, y, hf, amp)
    return x.numel() * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-8m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="also measure llmkit under torch.compile")
    p.add_argument("--out", default="benchmarks/results/train.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    amp = torch.bfloat16 if args.precision == "bf16" else None
    config = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    ours = Transformer(config).train()
    import tempfile

    with tempfile.TemporaryDirectory() as d:  # the same weights in both, through the checkpoint
        ours.save_pretrained(d)
        theirs = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").train()
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)

    results = {}
    # Interleave the two so that a noisy neighbour slows both alike; keep the best of two rounds.
    for _ in range(2):
        results["transformers"] = max(results.get("transformers", 0.0),
                                      measure(theirs, x, y, args.steps, args.warmup, hf=True, amp=amp))
        results["llmkit"] = max(results.get("llmkit", 0.0), measure(ours, x, y, args.steps, args.warmup, amp=amp))
    if args.compile:
        results["llmkit_compiled"] = measure(torch.compile(ours), x, y, args.steps, args.warmup, amp=amp)
    report = {
        "benchmark": "train_tokens_per_s", "preset": args.preset, "batch": args.batch, "seq": args.seq,
        "precision": args.precision, "threads": args.threads, "steps": args.steps,
        "parameters": ours.num_parameters(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "tokens_per_s": {k: round(v, 1) for k, v in results.items()},
        "ratio_llmkit_vs_transformers": round(results["llmkit"] / results["transformers"], 3),
    }
    if "llmkit_compiled" in results:
        report["ratio_llmkit_compiled_vs_transformers"] = round(results["llmkit_compiled"] / results["transformers"], 3)
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
