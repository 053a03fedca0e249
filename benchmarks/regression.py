"""Before/after: this tree against an earlier commit, on the hot paths, taking turns.

A change to the model core must not slow training or decoding. This checks out `--base` (by default
54c40a7, the last commit before the one-forward-path model of issue 17) into a temporary git
worktree and runs the same probe against both trees, each in a fresh process with `PYTHONPATH`
pointing at its tree, alternating base/head/head/base... so that a noisy machine hits both alike.
Each probe measures, after a warm-up (which also compiles):

- train: ms per AdamW step of a `llama-2m` model (vocabulary 4096) on 16 x 256 tokens, with the
  loss from `model(x, labels=y)`;
- prefill: ms of one 512-token forward of SmolLM2-135M-Instruct (the real GGUF);
- decode_eager / decode_compiled / decode_compiled_int4: ms per one-token `DecodeStep` at batch 1
  on that model, eager, compiled, and compiled after `quantize(bits=4)` (llmkit.quant, formerly llmkit.generate.fast).

Each figure is the median step within a probe; a tree's figure is the median over its probes.
Ratios are head/base time (below 1 is faster now). Writes benchmarks/results/regression.json with
the command, both commits, the machine and every probe's figures.

    python benchmarks/regression.py                  # 54c40a7 vs the working tree, 3 probes each
    python benchmarks/regression.py --base HEAD~1 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The probe uses only API that both trees have (llmkit.load, Transformer(x, labels=), DecodeStep,
# KVCache(config, batch, length), quantize); it prints one JSON line.
PROBE = r"""
import json, statistics, sys, time
import torch, llmkit
from llmkit import KVCache, ModelConfig, Transformer
from llmkit.generate.engine import DecodeStep
try:  # trees before llmkit/quant/ (the package path may reach other trees' submodules: checked below)
    from llmkit.generate.fast import quantize
except ImportError:
    from llmkit.quant import quantize

torch.set_num_threads(int(sys.argv[1]))
steps = int(sys.argv[2])

def median_ms(fn, n, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)

out = {"llmkit": llmkit.__file__}
torch.manual_seed(0)
model = Transformer(ModelConfig.from_preset("llama-2m", vocab_size=4096))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 4096, (16, 257), generator=torch.Generator().manual_seed(0))

def train_step():
    result = model(x[:, :-1], labels=x[:, 1:])
    loss = result if torch.is_tensor(result) else result.loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

out["train"] = median_ms(train_step, max(10, steps // 10), 3)

model, _ = llmkit.load("smollm2-135m-instruct")
prompt = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out["prefill"] = median_ms(lambda: model(prompt), max(5, steps // 30), 2)
    for name, compile_ in (("decode_eager", False), ("decode_compiled", True), ("decode_compiled_int4", True)):
        if name.endswith("int4"):
            quantize(model, bits=4)
        step = DecodeStep(model, compile=compile_)
        cache = KVCache(model.config, 1, steps + 64)
        token = torch.tensor([1])
        out[name] = median_ms(lambda: step(token, cache), steps, 20)
tree = llmkit.__file__.rsplit("/llmkit/", 1)[0]
out["foreign"] = sorted(m.__file__ for name, m in list(sys.modules.items())
                        if name.startswith("llmkit") and getattr(m, "__file__", None) and not m.__file__.startswith(tree))
print(json.dumps(out))
"""


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def probe(tree: Path, threads: int, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as cwd:  # not the repository root, so `import llmkit` finds `tree`
        run = subprocess.run([sys.executable, "-c", PROBE, str(threads), str(steps)], cwd=cwd, env=env,
                             capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"probe of {tree} failed:\n{run.stderr[-3000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if not Path(result["llmkit"]).resolve().is_relative_to(tree.resolve()) or result["foreign"]:
        raise RuntimeError(f"the probe of {tree} imported {result['llmkit']} and {result['foreign']}: "
                           "modules of another tree")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="54c40a7", help="the commit to compare the working tree with")
    p.add_argument("--rounds", type=int, default=3, help="probes of each tree (they alternate)")
    p.add_argument("--steps", type=int, default=300, help="decode steps per probe (train and prefill take fewer)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/regression.json"))
    args = p.parse_args()
    base_commit = git("rev-parse", args.base)
    head_commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    worktree = Path(tempfile.mkdtemp(prefix="llmkit-base-"))
    git("worktree", "add", "--detach", str(worktree), base_commit)
    trees = {"base": worktree, "head": ROOT}
    probes: dict[str, list[dict]] = {"base": [], "head": []}
    started = time.time()
    try:
        for r in range(args.rounds):
            order = ("base", "head") if r % 2 == 0 else ("head", "base")
            for name in order:
                result = probe(trees[name], args.threads, args.steps)
                result.pop("llmkit"), result.pop("foreign")
                probes[name].append(result)
                print(f"round {r + 1}/{args.rounds} {name}: {result}", flush=True)
    finally:
        git("worktree", "remove", "--force", str(worktree))
    metrics = list(probes["head"][0])
    median = {name: {m: round(statistics.median(p[m] for p in runs), 3) for m in metrics} for name, runs in probes.items()}
    ratio = {m: round(median["head"][m] / median["base"][m], 3) for m in metrics}
    report = {
        "benchmark": "regression_ms", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) or "regression.py",
        "base_commit": base_commit, "head_commit": head_commit, "head_dirty": dirty,
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "threads": args.threads, "rounds": args.rounds, "decode_steps": args.steps,
        "median_ms": median, "ratio_head_over_base": ratio, "probes": probes,
        "seconds": round(time.time() - started), "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "notes": "ms per step, the median within each probe, then the median over a tree's probes; "
                 "ratio < 1 means the working tree is faster than the base",
    }
    print(json.dumps({"median_ms": median, "ratio_head_over_base": ratio}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
