"""recipes/mlm.yaml run whole, as its header says: data, an encoder tokenizer, shards, ten minutes of MLM.

Runs the header's commands up to `llmkit pretrain` in a fresh folder (recipes/ linked in) and writes
benchmarks/results/mlm_recipe.json with the command, the commit, the machine and the report's MLM
figures: masked-token accuracy over all chosen positions and at [MASK] positions, the unigram baseline
and the MLM perplexity, plus every evaluation.

    python benchmarks/mlm_recipe.py
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    header = [line for line in (ROOT / "recipes/mlm.yaml").read_text().splitlines() if line.startswith("#")]
    commands = [shlex.split(m, comments=True) for line in header if (m := (re.match(r"#\s{2,}(llmkit .*)", line)
                                                                            or [None, None])[1])]
    commands = commands[:next(i for i, c in enumerate(commands) if c[1] == "pretrain") + 1]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "recipes").symlink_to(ROOT / "recipes")
        seconds = {}
        for argv in commands:
            print("$", " ".join(argv), flush=True)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "llmkit", *argv[1:], *(["--progress", "false"]
                            if argv[1] == "pretrain" else [])], cwd=folder, env=env, check=True)
            seconds[" ".join(argv)] = round(time.perf_counter() - started, 1)
        run = Path(folder) / "runs/mlm"
        report = json.loads((run / "report.json").read_text())
        evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in line]
    result = {"command": "python benchmarks/mlm_recipe.py", "commit": commit,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "load_average_at_end": os.getloadavg()[0]},
              "recipe_commands": list(seconds), "seconds": seconds, "steps": report.get("steps"),
              "mlm": report["mlm"],
              "evaluations": [{k: e[k] for k in ("step", "val_loss", "val_accuracy", "val_mask_accuracy")}
                              for e in evals]}
    out = ROOT / "benchmarks/results/mlm_recipe.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["mlm"], indent=2))


if __name__ == "__main__":
    main()
