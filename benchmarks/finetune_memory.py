"""`llmkit memory`'s estimate against the measured memory of training SmolLM2-135M on this CPU.

Each method (full, lora, qlora int8/int4) runs in its own process: load the model, set it up for the
method, release freed memory to the OS (malloc_trim), then reset the peak-RSS window and run
`--steps` AdamW steps (fp32, batch x seq tokens of real reviews). Reported per method:

- weights: RSS after setup minus the RSS of the bare runtime (python + torch + tokenizer), vs the
  estimate's weights;
- training: peak RSS during the steps minus RSS after setup, vs gradients + optimizer + activations.

    python benchmarks/finetune_memory.py            # writes benchmarks/results/finetune_memory.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "finetune_memory.json"
METHODS = {"full": ("full", 0), "lora": ("lora", 0), "qlora-int8": ("qlora", 8), "qlora-int4": ("qlora", 4)}


def rss_mb() -> float:
    from llmkit.train.memory import rss_mb as resident

    return resident()


def release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(name: str, batch: int, seq: int, steps: int) -> dict:
    from llmkit.analysis.accounting import training_memory
    from llmkit.data.labelled import movie_reviews, sentiment_prompt
    from llmkit.formats import gguf, named
    from llmkit.model import Transformer
    from llmkit.peft.lora import LoraConfig, apply_lora, trainable_parameters
    from llmkit.train.memory import peak_rss_mb, reset_peak_rss
    from llmkit.train.objectives import causal_lm_loss

    method, bits = METHODS[name]
    tokenizer = gguf.read_tokenizer(named.resolve("smollm2-135m-instruct"))
    texts = [sentiment_prompt(r.text) + " positive" for r in movie_reviews()[:batch * steps * 4]]
    rows = torch.full((batch * steps, seq), tokenizer.eos_id)  # reviews, EOS-filled to seq tokens
    for i, t in enumerate(tokenizer.encode(x)[:seq] for x in texts[:batch * steps]):
        rows[i, :len(t)] = torch.tensor(t)
    release()
    runtime = rss_mb()
    model = Transformer.from_pretrained("smollm2-135m-instruct", dtype=torch.float32)
    targets = ("q", "k", "v", "o", "gate", "up", "down")
    if method != "full":
        apply_lora(model, LoraConfig(r=8, alpha=16, targets=targets, base_bits=bits))
    model.train()
    release()
    after_setup = rss_mb()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    reset_peak_rss()
    started = time.perf_counter()
    for step in range(steps):
        x = rows[step * batch:(step + 1) * batch]
        loss, _ = causal_lm_loss(model, (x[:, :-1], x[:, 1:]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_s = (time.perf_counter() - started) / steps
    peak = peak_rss_mb()
    estimate = training_memory(model.config, method, batch, seq - 1, precision="fp32", lora_r=8,
                               lora_targets=targets, base_bits=bits or 4)
    est = {k: v / 2**20 for k, v in estimate["bytes"].items()}
    return {"method": name, "trainable_parameters": trainable_parameters(model), "batch": batch, "seq": seq - 1,
            "measured_weights_mb": round(after_setup - runtime, 1), "estimated_weights_mb": round(est["weights"], 1),
            "measured_training_mb": round(peak - after_setup, 1),
            "estimated_training_mb": round(est["gradients"] + est["optimizer"] + est["activations"], 1),
            "estimated_parts_mb": {k: round(v, 1) for k, v in est.items()},
            "measured_peak_rss_mb": round(peak, 1), "runtime_rss_mb": round(runtime, 1),
            "step_s": round(step_s, 2)}


def table(stored: dict) -> str:
    lines = ["| method | trainable | weights: estimate / measured | training: estimate / measured | "
             "peak RSS | step |", "|---|---:|---:|---:|---:|---:|"]
    for r in stored["results"]:
        lines.append(f"| {r['method']} | {r['trainable_parameters']:,} | {r['estimated_weights_mb']:.0f} / "
                     f"{r['measured_weights_mb']:.0f} MiB | {r['estimated_training_mb']:.0f} / "
                     f"{r['measured_training_mb']:.0f} MiB | {r['measured_peak_rss_mb']:.0f} MiB | {r['step_s']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(METHODS), help="measure one method (in this process)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=65)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the stored results")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    if args.method:
        print(json.dumps(measure(args.method, args.batch, args.seq, args.steps)))
        return
    results = []
    for name in METHODS:
        out = subprocess.run([sys.executable, __file__, "--method", name, "--batch", str(args.batch), "--seq",
                              str(args.seq), "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": "smollm2-135m-instruct", "precision": "fp32", "results": results},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
