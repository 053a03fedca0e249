"""KV-cache memory of Gemma-3-270M by context: sliding-window layers as ring buffers against full caches.

Gemma-3 keeps 15 of its 18 layers local (a 512-token window) and 3 global. llmkit's KVCache gives a
local layer a ring of `window` entries, so only the global layers grow with the context. For each
context the cache is allocated for one sequence as the model uses it ("ring") and, for comparison,
with every layer holding the whole context ("full", what a cache without sliding-window support
holds). Reported per dtype: the bytes of the key/value tensors (`KVCache.nbytes`) and the growth of
the resident memory of a fresh process while the cache is allocated and zero-filled (psutil; one
process per cache, so no allocator reuses what an earlier cache freed), which checks that the tensors
are all there is.

    python benchmarks/kv_cache_memory.py                      # 4k, 16k and 32k tokens
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from llmkit import KVCache, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "kv_cache_memory.json"
MiB = 2 ** 20


def measure(config: ModelConfig, context: int, dtype: torch.dtype) -> dict:
    """Tensor bytes and resident-memory growth of one KVCache of `context` slots (run in its own process)."""
    before = psutil.Process().memory_info().rss
    cache = KVCache(config, batch_size=1, max_len=context, dtype=dtype)
    grown = psutil.Process().memory_info().rss - before
    result = {"bytes": cache.nbytes, "MiB": round(cache.nbytes / MiB, 1), "rss_growth_MiB": round(grown / MiB, 1),
              "layer_slots": [w or context for w in cache.windows]}
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gemma-3-270m")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    config = ModelConfig.from_preset(args.preset)
    full = config.replace(sliding_window=None, layer_types=None)
    results = {}
    points = [(n, name, dtype) for n in args.contexts for name in ("ring", "full")
              for dtype in (torch.float32, torch.bfloat16)]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        for n, name, dtype in tqdm(points, desc="KV caches", unit="cache"):
            row = results.setdefault(str(n), {}).setdefault(name, {})
            measured = pool.submit(measure, config if name == "ring" else full, n, dtype).result()
            row[str(dtype).removeprefix("torch.")] = measured
    for row in results.values():
        row["full_over_ring"] = round(row["full"]["float32"]["bytes"] / row["ring"]["float32"]["bytes"], 2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    report = {
        "benchmark": "kv_cache_memory", "preset": args.preset, "commit": commit,
        "command": " ".join(["python benchmarks/kv_cache_memory.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__},
        "model": {"n_layer": config.n_layer, "n_kv_head": config.n_kv_head, "head_dim": config.head_dim,
                  "sliding_window": config.sliding_window,
                  "global_layers": [i for i in range(config.n_layer) if config.layer_type(i) == "full_attention"]},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for n, row in results.items():
        print(f"{int(n):>6} tokens: ring {row['ring']['float32']['MiB']:8.1f} MiB fp32 "
              f"({row['ring']['bfloat16']['MiB']:.1f} bf16), full {row['full']['float32']['MiB']:8.1f} MiB fp32 "
              f"({row['full']['bfloat16']['MiB']:.1f} bf16): {row['full_over_ring']}x")
    return report


if __name__ == "__main__":
    main()
