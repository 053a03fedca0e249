"""Atomic writes: the target appears whole or not at all, with ordinary permissions."""

import os

import pytest
import torch

from llmkit.files import atomic_path, atomic_write_text


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_files_get_the_umask_permissions_not_0600(tmp_path):
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "b.txt", "x")
        with atomic_path(tmp_path / "c.safetensors") as tmp:  # safetensors replaces the file with its own 0600 one
            save_file({"w": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o644
