"""Atomic writes, checksums, JSON and JSONL reading, and the cache folder: the bottom floor (imports only llmkit.errors).

A killed process must never leave a half-written file under its final name, so every write goes
to a temporary file in the same folder, is fsynced, and is then renamed over the target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkit.errors import DataError, FormatError, StorageError


def cache_dir() -> Path:
    """The llmkit cache: `$LLMKIT_CACHE`, else `~/.cache/llmkit`."""
    root = os.environ.get("LLMKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmkit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    Use it for writers that want a file name (safetensors, torch.save, numpy):
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file(tensors, tmp)

    A write that fails (a full disk, a read-only folder) raises StorageError naming `path`.
    """
    target = Path(path)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes 0600, and a writer may replace the file with its own 0600 one (safetensors does):
        # the final file gets the umask's permissions, set after the writer is done
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as e:
        if isinstance(e, StorageError):
            raise
        raise StorageError(f"cannot write {target}: {e.strerror or e}") from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_jsonl_rows(path: str | os.PathLike, expected: str) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed value) for each non-empty line of a JSONL file. A missing file or a line that
    is not JSON raises DataError naming it; `expected` says what the file should hold."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected {expected}")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line); expected {expected}") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); expected {expected}") from None
            yield f"{path}:{n}", row


def read_json(path: str | os.PathLike, expected: str) -> Any:
    """The JSON value in a file; a missing, non-UTF-8 or non-JSON file raises FormatError naming it and
    `expected` (what the file should hold)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e.strerror}); expected {expected}") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text (byte {e.start}); expected {expected}") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); expected "
                          f"{expected}") from None
