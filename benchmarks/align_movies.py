"""docs/align.md's runs, whole: the movie LM, its reward model, PPO, DPO, IPO, distillation and DPO-LoRA.

Runs every command docs/align.md shows, in order, in a fresh folder (recipes/ linked in), each as its own
process with `--threads` OpenMP threads, and writes benchmarks/results/align_movies.json: the command,
the commit, the machine, each command's wall time and peak RSS, and each run's report.json and held-out
evaluations (the rows of metrics.jsonl that carry `val_*` or `eval_*` figures). PPO's reward/KL plot is
copied to docs/align_ppo_reward_kl.png. docs/align.md quotes this file.

    python benchmarks/align_movies.py            # about 12 minutes on a 2-core machine
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = [  # (the command as docs/align.md shows it, the run folder it writes)
    ("llmkit speedrun --name movies --sources movie_reviews:1 --budget-minutes 2 --seed 1337", "runs/movies"),
    ("llmkit pretrain --config recipes/movie-lm.yaml", "runs/movie-lm"),
    ("llmkit reward --config recipes/reward-movies.yaml", "runs/reward-movies"),
    ("llmkit ppo --config recipes/ppo-movies.yaml", "runs/ppo-movies"),
    ("llmkit dpo --config recipes/dpo-movies.yaml", "runs/dpo-movies"),
    ("llmkit dpo --config recipes/dpo-movies.yaml --loss-type ipo --out-dir runs/ipo-movies", "runs/ipo-movies"),
    ("llmkit distill --config recipes/distill-movies.yaml", "runs/distill-soft"),
    ("llmkit distill --config recipes/distill-movies.yaml --alpha 0 --out-dir runs/distill-hard", "runs/distill-hard"),
    ("llmkit dpo --config recipes/dpo-smollm2-lora.yaml", "runs/dpo-smollm2-lora"),
]


def evaluations(run: Path) -> list[dict]:
    """The held-out rows of a run's metrics.jsonl (any folder below the run that has one)."""
    rows = []
    for metrics in sorted(run.rglob("metrics.jsonl")):
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if any(k.startswith(("val_", "eval_", "heldout")) for k in row):
                rows.append(row)
    return rows


def report_of(run: Path) -> dict | None:
    found = sorted(run.rglob("report.json"), key=lambda p: len(p.parts))
    return json.loads(found[0].read_text()) if found else None


def run_command(command: str, folder: Path, env: dict) -> tuple[float, float]:
    """Runs one docs command as a child process; its wall seconds and its own peak RSS (MiB)."""
    argv = shlex.split(command)
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "llmkit", *argv[1:]], cwd=folder, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, command)
    return round(time.perf_counter() - started, 1), round(usage.ru_maxrss / 1024, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every command")
    p.add_argument("--only", default="", help="comma-separated run folders to stop after (a partial check)")
    p.add_argument("--out", default="benchmarks/results/align_movies.json")
    args = p.parse_args(argv)
    started = provenance("benchmarks/align_movies.py", argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    runs = {}
    stop = set(filter(None, args.only.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "recipes").symlink_to(ROOT / "recipes")
        for command, run_dir in COMMANDS:
            print("$", command, flush=True)
            seconds, peak_mb = run_command(command, folder, env)
            run = folder / run_dir
            runs[run_dir] = {"command": command, "seconds": seconds, "peak_rss_mb": peak_mb,
                             "report": report_of(run), "evaluations": evaluations(run)}
            print(f"  {seconds} s", flush=True)
            if run_dir == "runs/ppo-movies" and (run / "reward_kl.png").exists():
                shutil.copyfile(run / "reward_kl.png", ROOT / "docs/align_ppo_reward_kl.png")
            if run_dir in stop:
                break
    result = {**started, "omp_num_threads": args.threads, "load_average_at_end": round(os.getloadavg()[0], 2),
              "runs": runs}
    out = ROOT / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
