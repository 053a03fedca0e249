"""recipes/mlm.yaml run whole, as its header says: data, an encoder tokenizer, shards, ten minutes of MLM.

Runs the header's commands up to `llmkit pretrain` in a fresh folder (recipes/ linked in) and writes
benchmarks/results/mlm_recipe.json with the command, the commit, the machine and the report's MLM
figures: masked-token accuracy over all chosen positions and at [MASK] positions, the unigram baseline
and the MLM perplexity, plus every evaluation.

    python benchmarks/mlm_recipe.py
    python benchmarks/mlm_recipe.py --model bert-2m --out benchmarks/results/mlm_recipe_bert.json

`--model` trains another encoder preset on the same recipe (BERT's learned positions against the
recipe's rotary ones).
"""

from __future__ import annotations

import argparse
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

from provenance import cpu_name

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="an encoder preset in place of the recipe's model")
    p.add_argument("--out", default="benchmarks/results/mlm_recipe.json")
    args = p.parse_args(argv)
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
            extra = ["--progress", "false", *(["--model", args.model] if args.model else [])]
            subprocess.run([sys.executable, "-m", "llmkit", *argv[1:], *(extra if argv[1] == "pretrain" else [])],
                           cwd=folder, env=env, check=True)
            seconds[" ".join(argv)] = round(time.perf_counter() - started, 1)
        run = Path(folder) / "runs/mlm"
        report = json.loads((run / "report.json").read_text())
        evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in line]
    command = " ".join(["python benchmarks/mlm_recipe.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command, "commit": commit, "model": report["config"]["model"],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "load_average_at_end": os.getloadavg()[0]},
              "recipe_commands": list(seconds), "seconds": seconds, "steps": report.get("steps"),
              "mlm": report["mlm"],
              "evaluations": [{k: e[k] for k in ("step", "val_loss", "val_accuracy", "val_mask_accuracy")}
                              for e in evals]}
    out = ROOT / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["mlm"], indent=2))


if __name__ == "__main__":
    main()
