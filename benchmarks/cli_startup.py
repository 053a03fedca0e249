"""How long `llmkit --help` takes, from a fresh process to its exit, over several runs.

The verbs' modules (and torch) are imported only when a verb runs, so the command line answers at
once; this measures it against a bare interpreter start, taking turns, and writes
benchmarks/results/cli_startup.json with the command, the commit and the machine.

    python benchmarks/cli_startup.py            # 10 runs each
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from provenance import cpu_name

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "llmkit --help": [sys.executable, "-m", "llmkit", "--help"],
    "llmkit generate --help": [sys.executable, "-m", "llmkit", "generate", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cli_startup.json"))
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs + 1):  # the first round warms the file cache and is not counted
        for name, cmd in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(cmd, env=env, cwd="/", check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - start)
    rows = {name: {"median_s": round(statistics.median(s[1:]), 3), "min_s": round(min(s[1:]), 3),
                   "max_s": round(max(s[1:]), 3)} for name, s in seconds.items()}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"command": "python benchmarks/cli_startup.py " + " ".join(sys.argv[1:]), "commit": commit,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": args.runs,
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "load_average_at_start": os.getloadavg()[0]},
              "seconds": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, row in rows.items():
        print(f"{name:24s} median {row['median_s']:.3f} s (min {row['min_s']:.3f}, max {row['max_s']:.3f})")


if __name__ == "__main__":
    main()
