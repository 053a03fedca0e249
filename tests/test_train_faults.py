"""Training survives its faults: SIGKILL inside a checkpoint write, a full disk during a save, and a
damaged trainer_state/. Each run is a few steps of llama-tiny on character shards of this repository's
own text, so the whole file takes seconds, not minutes."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_loop import RandomWindows, quiet, text_tokens, tiny_model

from llmkit import Transformer
from llmkit.data.shards import write_shards
from llmkit.errors import FormatError
from llmkit.files import sha256_file
from llmkit.tokenizer import Tokenizer
from llmkit.train import checkpoint
from llmkit.train.loop import train
from llmkit.train.objectives import causal_lm_loss

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: bit-identical losses


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Character-level train/val shards of the README and docs/architecture.md."""
    root = tmp_path_factory.mktemp("shards")
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "architecture.md").read_text()
    docs = [text[i:i + 2000] for i in range(0, len(text), 2000)]
    tokenizer = Tokenizer.train_chars(docs)
    tokenizer.save_pretrained(root / "tokenizer")
    write_shards(docs[1:], tokenizer, root / "train", workers=1, progress=False)
    write_shards(docs[:1], tokenizer, root / "val", workers=1, progress=False)
    return root


def pretrain_args(shards, out, *extra) -> list[str]:
    """6 steps, a checkpoint every 2, the last 2 kept."""
    return ["pretrain", "--model", "llama-tiny", "--data", str(shards), "--out-dir", str(out), "--context", "32",
            "--batch-size", "4", "--max-steps", "6", "--warmup-steps", "2", "--lr", "1e-2", "--eval-every", "0",
            "--save-every", "2", "--keep-last", "2", "--progress", "false", "--seed", "3", *extra]


def llmkit(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmkit", *args], env=ENV, capture_output=True, text=True,
                          timeout=300, **kwargs)


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def listing(out) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def whole(shards, tmp_path_factory):
    """The uninterrupted run every faulted one is compared with."""
    out = tmp_path_factory.mktemp("whole")
    run = llmkit(*pretrain_args(shards, out))
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def assert_loadable(path: Path) -> None:
    checkpoint.load_state(path)  # every file against its recorded sha256, then parsed
    Transformer.from_pretrained(path)


# ---- SIGKILL inside a checkpoint write ----------------------------------------------------------


@pytest.mark.parametrize("target, previous", [
    ("step-0000004.tmp/model.safetensors", "step-0000002"),  # a save in the middle of the run
    ("step-0000006.tmp/trainer_state/optimizer.pt", "step-0000004"),  # the final save
])
def test_sigkill_inside_a_checkpoint_write_then_resume_continues_the_curve(shards, whole, tmp_path, target, previous):
    out, marker = tmp_path / "run", tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_driver.py"), target, str(marker),
                             *pretrain_args(shards, out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting for the driver to reach the paused write, which it always does
    if not marker.exists():
        proc.kill()
        pytest.fail(f"the run never reached the write of {target}: {proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    half_written = Path(marker.read_text())
    assert half_written.is_file() and half_written.parent.as_posix().endswith(str(Path(target).parent))

    assert checkpoint.latest(out).name == previous  # the half-written one is not a checkpoint
    assert_loadable(out / "checkpoints" / previous)
    resumed = llmkit(*pretrain_args(shards, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == losses(whole)  # bit-identical, step for step
    assert listing(out) == listing(whole) == ["latest", "step-0000004", "step-0000006"]  # the .tmp is gone


# ---- a full disk -----------------------------------------------------------------------------


def _pages(*files: Path) -> int:
    """Bytes a tmpfs charges for these files: whole 4 KiB pages."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in files)


# The files of a checkpoint in the order the save writes them (hf.save_checkpoint, the tokenizer, trainer_state/).
WRITES = ["model.safetensors", "generation_config.json", "config.json", "tokenizer.json", "tokenizer_config.json",
          "trainer_state/optimizer.pt", "trainer_state/rng.pt", "trainer_state/state.json",
          "trainer_state/checksums.json"]


@pytest.mark.parametrize("fills_in", ["model.safetensors", "tokenizer.json", "trainer_state/optimizer.pt"])
def test_a_full_disk_during_a_save_is_one_error_and_keeps_the_previous_checkpoint(shards, whole, tmp_path, fills_in):
    """A real tmpfs, mounted in a private user and mount namespace (no root needed), sized from the
    uninterrupted run's files so that the disk fills halfway through `fills_in` of the second save
    (step 4): safetensors, tokenizers and torch each report a full disk in their own way."""
    ckpt = whole / "checkpoints" / "step-0000004"
    assert sorted(WRITES) == sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    before = WRITES[:WRITES.index(fills_in)]
    present = [whole / "config.json", whole / "metrics.jsonl", whole / "checkpoints" / "latest"]  # at step 4
    size = (_pages(*present) + _pages(*(ckpt / f for f in WRITES)) + _pages(*(ckpt / f for f in before))
            + _pages(ckpt / fills_in) // 2)
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    script = ('disk=$0 copy=$1 size=$2 python=$3; shift 3; mount -t tmpfs -o size="$size" tmpfs "$disk" || exit 90; '
              '"$python" -m llmkit "$@"; rc=$?; cp -a "$disk/." "$copy"; exit $rc')  # the tmpfs ends with the namespace
    run = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(disk), str(copy),
                          str(size), sys.executable, *pretrain_args(shards, disk / "run")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode != 90, f"cannot mount a tmpfs in a user namespace here: {run.stderr[-1000:]}"
    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert re.fullmatch(rf"llmkit pretrain: error: checkpoint \S+/run/checkpoints/step-0000004 could not be written "
                        rf"\(cannot write \S+/step-0000004\.tmp/{fills_in}: .*No space left on device.*\); the newest "
                        r"complete checkpoint is \S+/run/checkpoints/step-0000002\. .*", run.stderr.strip()), run.stderr
    out = copy / "run"
    assert listing(out) == ["latest", "step-0000002"]  # the partial step-0000004.tmp was removed
    assert_loadable(out / "checkpoints" / "step-0000002")
    assert losses(out) == losses(whole)[:4]


# ---- a damaged trainer_state/ ------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run folder whose checkpoint step-0000002 is good."""
    out = tmp_path_factory.mktemp("saved")
    train(tiny_model(), causal_lm_loss, RandomWindows(text_tokens(), 2, 16), quiet(max_steps=2, warmup_steps=1), out)
    return out


def _flip(file: Path, at: float = 0.5) -> None:
    data = bytearray(file.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    file.write_bytes(bytes(data))


def _wrong_shape(folder: Path) -> None:
    """A well-formed optimizer.pt with one moment of the wrong shape, with a matching checksum: a
    consistent file of the wrong content (another model's), which only the shape check can catch."""
    file = folder / "trainer_state" / "optimizer.pt"
    state = torch.load(file, weights_only=True)
    state["state"]["norm.weight"]["exp_avg"] = torch.zeros(3)
    torch.save(state, file)
    sums_file = folder / "trainer_state" / "checksums.json"
    sums = json.loads(sums_file.read_text())
    sums["sha256"]["trainer_state/optimizer.pt"] = sha256_file(file)
    sums_file.write_text(json.dumps(sums))


DAMAGE = {  # name -> (file, what is done to it, what the error says about it)
    "truncated optimizer": ("trainer_state/optimizer.pt", lambda f: f.write_bytes(f.read_bytes()[:1000]), "corrupt"),
    "flipped optimizer data": ("trainer_state/optimizer.pt", _flip, "corrupt"),
    "flipped rng": ("trainer_state/rng.pt", lambda f: _flip(f, 0.1), "corrupt"),
    "edited step": ("trainer_state/state.json",
                    lambda f: f.write_text(f.read_text().replace('"step": 2', '"step": 1')), "corrupt"),
    "flipped weights": ("model.safetensors", lambda f: _flip(f, 0.9), "corrupt"),
    "missing rng": ("trainer_state/rng.pt", Path.unlink, "missing"),
    "missing checksums": ("trainer_state/checksums.json", Path.unlink, "missing"),
    "truncated checksums": ("trainer_state/checksums.json", lambda f: f.write_bytes(f.read_bytes()[:40]),
                            "cannot be read"),
    "wrong-shaped moment": ("trainer_state/optimizer.pt", lambda f: _wrong_shape(f.parents[1]),
                            r"exp_avg of norm\.weight is \[3\], expected a tensor of shape \[64\]"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_trainer_state_is_named_and_nothing_is_half_loaded(saved, tmp_path, case):
    name, damage, says = DAMAGE[case]
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    file = out / "checkpoints" / "step-0000002" / name
    damage(file)
    model, data = tiny_model(seed=1), RandomWindows(text_tokens(), 2, 16, seed=5)
    before, data_before = {k: v.clone() for k, v in model.state_dict().items()}, data.state_dict()
    with pytest.raises(FormatError, match=f"{re.escape(str(file))}.*{says}"):  # max_steps = the checkpoint's: no step
        train(model, causal_lm_loss, data, quiet(max_steps=2, warmup_steps=1, resume=True), out)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert data.state_dict() == data_before
