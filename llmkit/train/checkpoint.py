"""Training checkpoints: an HF folder a user can load anywhere, plus `trainer_state/` for resume.

    <out>/checkpoints/step-0000100/
        config.json, model.safetensors, ...   the model (transformers loads it as is)
        trainer_state/optimizer.pt            optimizer moments (tensors only: weights_only load)
        trainer_state/rng.pt                  torch / cuda / python RNG states
        trainer_state/state.json              step, tokens seen, data position, run config
    <out>/checkpoints/latest                  the name of the newest complete checkpoint

A checkpoint is written into `step-N.tmp/` and renamed into place only when complete, so a
process killed at any moment leaves the previous checkpoint intact and no half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmkit.config import ModelConfig
from llmkit.errors import FormatError
from llmkit.files import atomic_path, atomic_write_json, atomic_write_text, fsync_dir
from llmkit.formats import hf

STATE_DIR = "trainer_state"


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out_dir: Path, step: int, config: ModelConfig, model_state: dict[str, torch.Tensor],
         optimizer_state: dict, state: dict[str, Any], keep_last: int = 2,
         write_extra: Callable[[Path], None] | None = None,
         save_weights: Callable[[Path, dict[str, torch.Tensor]], None] | None = None) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it and prune to `keep_last`.

    save_weights: writes the model state in another layout (a LoRA adapter) instead of an HF folder."""
    root = checkpoint_dir(out_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    if save_weights is not None:
        save_weights(tmp, model_state)
    else:
        hf.save_checkpoint(tmp, config, model_state)
    if write_extra is not None:
        write_extra(tmp)  # e.g. the tokenizer files
    (tmp / STATE_DIR).mkdir()
    with atomic_path(tmp / STATE_DIR / "optimizer.pt") as p:
        torch.save(optimizer_state, p)
    with atomic_path(tmp / STATE_DIR / "rng.pt") as p:
        torch.save(rng_state(), p)
    atomic_write_json(tmp / STATE_DIR / "state.json", {"step": step, **state})
    if final.exists():  # a rerun over an old folder: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    if keep_last > 0:
        for old in complete_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old)
    return final


def complete_checkpoints(out_dir: Path) -> list[Path]:
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / STATE_DIR / "state.json").is_file())


def latest(out_dir: Path) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def resolve(spec: str) -> str:
    """What `llmkit.model.load` should read for `spec`: a training run's folder means its newest
    checkpoint; anything else (a checkpoint or HF folder, a .gguf file, a registry name) stays as is."""
    if Path(spec).is_dir() and (found := latest(Path(spec))) is not None:
        return str(found)
    return spec


def load_state(path: Path) -> tuple[dict[str, Any], dict, dict[str, Any]]:
    """(state.json contents, optimizer state, RNG states) of a checkpoint folder."""
    folder = Path(path) / STATE_DIR
    try:
        state = json.loads((folder / "state.json").read_text())
        optimizer = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = torch.load(folder / "rng.pt", weights_only=True, map_location="cpu")
    except (OSError, json.JSONDecodeError, RuntimeError) as e:
        raise FormatError(f"{folder}: cannot read the trainer state ({e})") from None
    return state, optimizer, rng
