"""Training checkpoints: an HF folder a user can load anywhere, plus `trainer_state/` for resume.

    <out>/checkpoints/step-0000100/
        config.json, model.safetensors, ...   the model (transformers loads it as is)
        trainer_state/optimizer.pt            optimizer moments (tensors only: weights_only load)
        trainer_state/rng.pt                  torch / cuda / python RNG states
        trainer_state/state.json              step, tokens seen, data position, run config
        trainer_state/checksums.json          the sha256 of every other file, written last
    <out>/checkpoints/latest                  the name of the newest complete checkpoint

A checkpoint is written into `step-N.tmp/` and renamed into place only when complete, so a
process killed at any moment leaves the previous checkpoint intact and no half-written one; a
write that fails (a full disk) removes `step-N.tmp/` and raises one StorageError. Resuming checks
every file against checksums.json before anything is loaded, so a truncated or changed file is
named, never half-loaded.
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
from safetensors import SafetensorError

from llmkit.config import ModelConfig
from llmkit.errors import FormatError, StorageError
from llmkit.files import atomic_path, atomic_write_json, atomic_write_text, fsync_dir, sha256_file
from llmkit.formats import hf
from llmkit.formats.runs import STATE_DIR, checkpoint_dir, complete_checkpoints, latest  # noqa: F401 (the run layout)

CHECKSUMS = "checksums.json"


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

    save_weights: writes the model state in another layout (a LoRA adapter) instead of an HF folder.
    A write that fails (a full disk, a read-only folder) raises StorageError after removing the
    partial `step-N.tmp/`, so the space is given back and the previous checkpoint stays the newest."""
    root = checkpoint_dir(out_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        if save_weights is not None:
            save_weights(tmp, model_state)
        else:
            hf.save_checkpoint(tmp, config, model_state)
        if write_extra is not None:
            write_extra(tmp)  # e.g. the tokenizer files
        (tmp / STATE_DIR).mkdir()
        _torch_save(optimizer_state, tmp / STATE_DIR / "optimizer.pt")
        _torch_save(rng_state(), tmp / STATE_DIR / "rng.pt")
        atomic_write_json(tmp / STATE_DIR / "state.json", {"step": step, **state})
        atomic_write_json(tmp / STATE_DIR / CHECKSUMS, {"sha256": _checksums(tmp)})
        if final.exists():  # a rerun over an old folder: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / "latest", final.name + "\n")
    except (OSError, SafetensorError) as e:  # (an adapter's safetensors reports a full disk as its own error)
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise StorageError(f"checkpoint {final} could not be written ({reason}); the newest complete checkpoint is "
                           f"{latest(out_dir) or 'none'}. Free space (or fix the folder's permissions) and rerun "
                           "with --resume") from None
    if keep_last > 0:
        for old in complete_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old)
    return final


def _torch_save(obj, path: Path) -> None:
    """torch.save, atomically, into an open file so that a failed write raises its OSError (ENOSPC),
    which torch's zip writer otherwise hides behind RuntimeError("unexpected pos ...")."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def _checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (but checksums.json), by path relative to it."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != f"{STATE_DIR}/{CHECKSUMS}"}


def load_state(path: Path) -> tuple[dict[str, Any], dict, dict[str, Any]]:
    """(state.json contents, optimizer state, RNG states) of a checkpoint folder, after every file of
    the folder (weights included) matched the sha256 that checksums.json recorded when it was written.
    Any problem is one FormatError naming the file; nothing is loaded into a model here."""
    path = Path(path)
    verify(path)
    folder = path / STATE_DIR
    state = _read_file(folder / "state.json", lambda f: json.loads(f.read_text()))
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and "data" in state):
        raise FormatError(f"{folder / 'state.json'}: expected a JSON object with an integer 'step' and the "
                          "data position 'data'")
    optimizer = _read_file(folder / "optimizer.pt", _torch_load)
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise FormatError(f"{folder / 'optimizer.pt'}: expected an optimizer state dict with 'state' and "
                          "'param_groups'")
    rng = _read_file(folder / "rng.pt", _torch_load)
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
            and rng["torch"].dtype == torch.uint8 and isinstance(rng.get("python"), tuple)):
        raise FormatError(f"{folder / 'rng.pt'}: expected the RNG states {{'torch': a uint8 tensor, 'python': "
                          "random.getstate()}")
    return state, optimizer, rng


def verify(path: Path) -> None:
    """Raise FormatError naming the first file of checkpoint `path` that is missing or whose sha256
    differs from the one checksums.json recorded when the checkpoint was written."""
    manifest = path / STATE_DIR / CHECKSUMS
    sums = _read_file(manifest, lambda f: json.loads(f.read_text()).get("sha256"))
    if not (isinstance(sums, dict) and sums and all(isinstance(v, str) for v in sums.values())):
        raise FormatError(f"{manifest}: expected {{'sha256': {{file: hex digest, ...}}}} for every file of the "
                          "checkpoint")
    for name, expected in sums.items():
        file = path / name
        if not file.is_file():
            raise FormatError(f"{file} is missing; {manifest} lists it as part of the checkpoint")
        if (found := sha256_file(file)) != expected:
            raise FormatError(f"{file} is corrupt: its sha256 is {found[:16]}..., but {expected[:16]}... when the "
                              "checkpoint was written (truncated, changed or damaged on disk)")


def _torch_load(file: Path):
    return torch.load(file, weights_only=True, map_location="cpu")


def _read_file(file: Path, read: Callable[[Path], Any]) -> Any:
    if not file.is_file():
        raise FormatError(f"{file} is missing; expected it in every checkpoint llmkit writes")
    try:
        return read(file)
    except Exception as e:  # torch.load, json: each raises its own kinds on a damaged file
        raise FormatError(f"{file}: cannot be read ({type(e).__name__}: {str(e)[:200]})") from None


def check_fits(path: Path, weights: dict[str, torch.Tensor], optimizer_state: dict,
               shapes: dict[str, torch.Size], groups: list[list[str]]) -> None:
    """Raise FormatError unless a checkpoint's weights and optimizer moments fit the model to resume:
    `shapes` its state dict's shapes, `groups` its optimizer's parameter names per group. Checked before
    anything is loaded: torch copies the tensors that fit before failing on one that does not (a
    half-loaded model), and takes an optimizer moment of any shape (the first step then fails, or
    allocates without bound)."""
    where = f"the weights of {path}"
    missing, unexpected = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    if missing or unexpected:
        raise FormatError(f"{where}: missing {missing[:5]}, unexpected {unexpected[:5]}; expected this model's tensors")
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise FormatError(f"{where}: {name} has shape {list(weights[name].shape)}, expected {list(shape)}")
    file = path / STATE_DIR / "optimizer.pt"
    saved = [g.get("params") if isinstance(g, dict) else None for g in optimizer_state["param_groups"]]
    if saved != groups:
        raise FormatError(f"{file}: its parameter groups list {_short(saved)}; this run's optimizer has {_short(groups)}")
    for name, moments in optimizer_state["state"].items():
        if name not in shapes or not isinstance(moments, dict):
            raise FormatError(f"{file}: state for {name!r}, which is not a parameter of this model")
        for key, t in moments.items():
            if not isinstance(t, torch.Tensor) or (t.dim() > 0 and tuple(t.shape) != tuple(shapes[name])):
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise FormatError(f"{file}: {key} of {name} is {got}, expected a tensor of shape {list(shapes[name])}")


def _short(groups) -> str:
    return str([g[:3] + ["..."] if isinstance(g, list) and len(g) > 3 else g for g in groups])
