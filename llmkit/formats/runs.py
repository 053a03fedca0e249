"""The layout of a training run's folder: `checkpoints/step-N/`, each complete once its
`trainer_state/state.json` is written (the last file of a save). Wherever a model is loaded, a run's
folder names its newest complete checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR = "trainer_state"


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def complete_checkpoints(out_dir: Path) -> list[Path]:
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / STATE_DIR / "state.json").is_file())


def latest(out_dir: Path) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def newest(spec: str | os.PathLike) -> Path:
    """What a path names as a model: a run folder its newest complete checkpoint, anything else itself."""
    path = Path(spec)
    return (latest(path) or path) if path.is_dir() else path
