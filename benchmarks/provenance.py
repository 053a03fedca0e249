"""What reproduces a benchmark's result: the command, the commit (and uncommitted files), the machine, the date.

Every script in benchmarks/ stores this next to its figures, so a result file says how to get it again.
Scripts run as `python benchmarks/NAME.py`, which puts this folder first on sys.path: `from provenance import ...`.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout


def provenance(script: str, argv: list[str] | None = None) -> dict:
    """`script` as the repository names it (benchmarks/x.py); `argv` the arguments (default: sys.argv's)."""
    import torch

    return {"command": " ".join([f"python {script}", *(sys.argv[1:] if argv is None else argv)]),
            "commit": _git("rev-parse", "HEAD").strip(),
            "uncommitted_changes": [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no")
                                    .splitlines() if line.strip()],
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2),
                        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version()},
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
