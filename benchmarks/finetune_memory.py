"""`llmkit memory`'s estimate against the measured peak memory of fine-tuning on this CPU.

Each method (full, lora, qlora int8/int4) runs in a fresh process, once per allocator: load the
model (SmolLM2-135M-Instruct by default; a preset name builds a random one of that shape), set it
up for the method, measure the resident memory, then run `--steps` optimizer steps of the training
loop's own step (`TrainingStep` with the loop's fused AdamW; fp32, batch x seq random tokens:
memory depends on shapes only). Reported per method and allocator: the peak RSS during the steps
against `training_memory(..., runtime_bytes=RSS before the model)`, and the RSS after setup minus
that runtime against the estimate's weights.

Allocators: "returning" runs with MALLOC_MMAP_THRESHOLD_=131072, so glibc maps every block over
128 KiB on its own and returns it when freed: the resident memory is what the tensors need, which
the estimate counts. "glibc default" keeps freed blocks for reuse, which makes the same steps 1.5x
faster on small models but holds far more memory, growing over the first steps.

    python benchmarks/finetune_memory.py            # writes benchmarks/results/finetune_memory.json
    python benchmarks/finetune_memory.py --table    # the Markdown table of the stored results
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "finetune_memory.json"
METHODS = {"full": ("full", 0), "lora": ("lora", 0), "qlora-int8": ("qlora", 8), "qlora-int4": ("qlora", 4)}
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ALLOCATORS = {"returning": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "glibc default": {}}


def release() -> None:
    """Free what Python holds and hand glibc's free heap pages back, so RSS readings start clean."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(name: str, model_name: str, batch: int, seq: int, steps: int) -> dict:
    """One method in this process: RSS of the runtime, after setup and at the peak of the steps."""
    import torch

    from llmkit.analysis.accounting import training_memory
    from llmkit.config import PRESETS, ModelConfig
    from llmkit.model import Transformer
    from llmkit.peft.lora import LoraConfig, apply_lora, trainable_parameters
    from llmkit.train.loop import TrainingStep
    from llmkit.train.memory import peak_rss_mb, reset_peak_rss, rss_mb
    from llmkit.train.objectives import causal_lm_loss
    from llmkit.train.optimizers import adamw

    method, bits = METHODS[name]
    release()
    runtime = rss_mb()
    torch.manual_seed(0)
    if model_name in PRESETS:
        model = Transformer(ModelConfig.from_preset(model_name))
    else:
        model = Transformer.from_pretrained(model_name, dtype=torch.float32)
    if method != "full":
        apply_lora(model, LoraConfig(r=8, alpha=16, targets=TARGETS, base_bits=bits))
    model.train()
    release()
    after_setup = rss_mb()
    step = TrainingStep(model, causal_lm_loss, adamw(model, 1e-5, 0.0), torch.device("cpu"))
    rows = torch.randint(0, model.config.vocab_size, (steps, batch, seq + 1), generator=torch.Generator().manual_seed(0))
    reset_peak_rss()
    started = time.perf_counter()
    for x in rows:
        step(lambda x=x: (x[:, :-1], x[:, 1:]))
    step_s = (time.perf_counter() - started) / steps
    peak = peak_rss_mb()
    estimate = training_memory(model.config, method, batch, seq, precision="fp32", lora_r=8, lora_targets=TARGETS,
                               base_bits=bits or 4, runtime_bytes=int(runtime * 2**20))
    mb = {k: round(v / 2**20, 1) for k, v in estimate["bytes"].items()}
    return {"method": name, "allocator": "returning" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "glibc default",
            "trainable_parameters": trainable_parameters(model), "batch": batch, "seq": seq, "steps": steps,
            "runtime_rss_mb": round(runtime, 1), "measured_weights_mb": round(after_setup - runtime, 1),
            "estimated_weights_mb": mb["weights"], "measured_peak_rss_mb": round(peak, 1),
            "estimated_peak_rss_mb": round(estimate["total_bytes"] / 2**20, 1),
            "measured_over_estimate": round(peak / (estimate["total_bytes"] / 2**20), 3),
            "estimated_parts_mb": mb, "step_s": round(step_s, 2)}


def run(name: str, model: str, batch: int, seq: int, steps: int, allocator: str = "returning") -> dict:
    """`measure` in a fresh process (so no method's memory is another's) under `allocator`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | ALLOCATORS[allocator]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])  # this tree's llmkit
    out = subprocess.run([sys.executable, __file__, "--method", name, "--model", model, "--batch", str(batch),
                          "--seq", str(seq), "--steps", str(steps)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{name} ({allocator}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """The CPU as /proc/cpuinfo names it (model name, family/model/stepping, the vector units torch's
    kernels use), cores, memory, and the software versions."""
    import torch

    fields = {}
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    flags = [f for f in fields.get("flags", "").split() if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                                                 "amx_bf16", "amx_int8")]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "cpu_id": {k: fields[k] for k in ("vendor_id", "cpu family", "model", "stepping") if k in fields},
            "cpu_flags": flags, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def table(stored: dict) -> str:
    lines = ["| method | allocator | trainable | weights: estimate / measured | peak RSS: estimate / measured | "
             "measured / estimate | step |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in stored["results"]:
        lines.append(f"| {r['method']} | {r['allocator']} | {r['trainable_parameters']:,} | "
                     f"{r['estimated_weights_mb']:.0f} / {r['measured_weights_mb']:.0f} MiB | "
                     f"{r['estimated_peak_rss_mb']:.0f} / {r['measured_peak_rss_mb']:.0f} MiB | "
                     f"{r['measured_over_estimate']:.2f} | {r['step_s']:.1f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(METHODS), help="measure one method (in this process)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a registry name or a preset (random weights)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64, help="tokens per row")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps (the second holds AdamW's state)")
    parser.add_argument("--allocators", default="returning,glibc default", help=f"comma-separated: {list(ALLOCATORS)}")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the stored results")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    if args.method:
        print(json.dumps(measure(args.method, args.model, args.batch, args.seq, args.steps)))
        return
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                             cwd=ROOT).stdout.split("\n")  # the tree the runs use, as they start
    results = []
    for allocator in args.allocators.split(","):
        for name in METHODS:
            results.append(run(name, args.model, args.batch, args.seq, args.steps, allocator))
            print(json.dumps(results[-1]), flush=True)
    report = {"benchmark": "finetune_memory", "model": args.model, "precision": "fp32",
              "command": " ".join(["python benchmarks/finetune_memory.py", *(sys.argv[1:] if argv is None else argv)]),
              "commit": commit, "uncommitted_changes": [line[3:] for line in changed if line.strip()],
              "machine": machine(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
