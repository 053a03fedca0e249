"""Token shards: a corpus tokenized once into flat memmapped arrays, and the loader that trains on them.

A shard is a raw little-endian `uint16` array (`uint32` when the vocabulary has more than 65,536
ids), each document followed by EOS, beside a `meta.json` that says the dtype, the EOS id, the
token counts and the tokenizer. numpy memmaps them, so a loader costs no memory and no start-up.

`ShardLoader` cuts the token stream into windows of `context + 1` tokens and visits them in a
permutation drawn from (seed, epoch); its position is a three-number state dict that the training
loop stores in its checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llmkit.errors import DataError, FormatError
from llmkit.files import atomic_path, atomic_write_json
from llmkit.tokenizer import Tokenizer

META = "meta.json"
FORMAT = "llmkit-shards-v1"

# ---- writing --------------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    from tokenizers import Tokenizer as Backend

    _worker_tokenizer = Backend.from_str(tokenizer_json)


def _encode_chunk(args: tuple[list[str], int, str]) -> np.ndarray:
    texts, eos, dtype = args
    out = []
    for enc in _worker_tokenizer.encode_batch(texts, add_special_tokens=False):
        out.append(np.asarray(enc.ids, dtype=dtype))
        out.append(np.asarray([eos], dtype=dtype))
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)


def _chunks(texts: Iterable[str], eos: int, dtype: str, size: int,
            max_chars: int = 1 << 19) -> Iterator[tuple[list[str], int, str]]:
    """Work units for the pool: `size` documents or `max_chars` characters, whichever comes first."""
    batch: list[str] = []
    chars = 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if len(batch) == size or chars >= max_chars:
            yield batch, eos, dtype
            batch, chars = [], 0
    if batch:
        yield batch, eos, dtype


def _bounded_map(pool: ProcessPoolExecutor, fn, jobs: Iterable, ahead: int) -> Iterator:
    """`pool.map` in order, but with at most `ahead` chunks in flight, so memory stays flat on big corpora."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(fn, job))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_shards(texts: Iterable[str], tokenizer: Tokenizer, out: str | os.PathLike, shard_tokens: int = 1 << 26,
                 workers: int | None = None, chunk_docs: int = 256, progress: bool = True) -> dict:
    """Tokenize `texts` (one document each) into `out/shard_NNNNN.bin` + `out/meta.json`; return the meta.

    Uses `workers` processes (default: all cores); each shard and the meta are written atomically, the
    meta last, so a folder with a meta.json is complete.
    """
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no EOS token; expected one to separate documents in the shards")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # an old meta must not vouch for shards this run overwrites
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    workers = workers or os.cpu_count() or 1
    shards, buffer, buffered, documents, total_docs = [], [], 0, 0, 0

    def flush():
        nonlocal buffer, buffered, documents
        name = f"shard_{len(shards):05d}.bin"
        with atomic_path(out / name) as tmp, open(tmp, "wb") as f:
            for arr in buffer:
                arr.tofile(f)
        shards.append({"file": name, "tokens": buffered, "documents": documents})
        buffer, buffered, documents = [], 0, 0

    jobs = _chunks(texts, tokenizer.eos_id, dtype, chunk_docs)
    if workers > 1:
        # fork is instant on Linux; elsewhere (macOS, Windows) fork is unsafe or missing, so spawn
        context = get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                   initargs=(tokenizer.backend.to_str(),))
        results = _bounded_map(pool, _encode_chunk, jobs, 2 * workers)
    else:
        pool = None
        _init_worker(tokenizer.backend.to_str())
        results = map(_encode_chunk, jobs)
    bar = tqdm(desc="tokenize", unit="tok", unit_scale=True, disable=not progress)
    try:
        for arr in results:
            docs_in = int((arr == tokenizer.eos_id).sum())  # each document ends with exactly one EOS
            total_docs += docs_in
            bar.update(len(arr))
            while len(arr):
                take = min(len(arr), shard_tokens - buffered)
                piece, arr = arr[:take], arr[take:]
                buffer.append(piece)
                buffered += take
                documents += int((piece == tokenizer.eos_id).sum())
                if buffered >= shard_tokens:
                    flush()
        if buffered:
            flush()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    total = sum(s["tokens"] for s in shards)
    if total == 0:
        raise DataError(f"no text to tokenize into {out}; expected a non-empty corpus")
    meta = {"format": FORMAT, "dtype": dtype, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "tokens": total, "documents": total_docs, "shards": shards}
    atomic_write_json(out / META, meta)
    return meta


def read_meta(path: str | os.PathLike) -> dict:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise FormatError(f"shard folder {path} has no {META}; expected a folder written by write_shards")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{meta_path} is not valid JSON ({e}); expected the shard metadata") from None
    if meta.get("format") != FORMAT:
        raise FormatError(f"{meta_path} has format {meta.get('format')!r}; expected {FORMAT!r}")
    return meta


def open_shards(path: str | os.PathLike) -> tuple[dict, list[np.memmap]]:
    """The metadata and a read-only memmap per shard, checked against the recorded sizes."""
    meta = read_meta(path)
    arrays = []
    for s in meta["shards"]:
        file = Path(path) / s["file"]
        expected = s["tokens"] * np.dtype(meta["dtype"]).itemsize
        if not file.is_file() or file.stat().st_size != expected:
            size = file.stat().st_size if file.is_file() else "missing"
            raise FormatError(f"shard {file} has size {size}; expected {expected} bytes ({s['tokens']} {meta['dtype']} tokens)")
        arrays.append(np.memmap(file, dtype=meta["dtype"], mode="r"))
    return meta, arrays


# ---- loading --------------------------------------------------------------------------------------


class ShardLoader:
    """`(x, y)` batches of shape (batch_size, context): y is x shifted by one token.

    Windows start at multiples of `context` inside a shard; each epoch visits all of them in the
    permutation drawn from (seed, epoch). With `world_size` > 1, rank r takes every r-th batch slice,
    so the ranks together see each window once per epoch.
    """

    def __init__(self, path: str | os.PathLike, batch_size: int, context: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        import torch  # noqa: F401  (fail early if torch is missing; batches are tensors)

        self.meta, self.arrays = open_shards(path)
        self.path, self.batch_size, self.context, self.seed = Path(path), batch_size, context, seed
        self.rank, self.world_size = rank, world_size
        counts = np.array([max(0, (len(a) - 1) // context) for a in self.arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.windows = int(self.starts[-1])
        self.batches_per_epoch = self.windows // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"shards in {path} hold {self.windows} windows of {context + 1} tokens; expected at least "
                            f"{batch_size * world_size} (batch_size x world_size); use a smaller batch or context")
        self.epoch, self.step = 0, 0
        self._perm: np.ndarray | None = None

    def state_dict(self) -> dict:
        """Where the loader is: store it in the checkpoint, give it back to `load_state_dict`."""
        return {"seed": self.seed, "epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise DataError(f"loader state has seed {state.get('seed')}; expected this loader's seed {self.seed}")
        self.epoch, self.step, self._perm = int(state["epoch"]), int(state["step"]), None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.windows)
        return self._perm

    def next_batch(self):
        import torch

        if self.step >= self.batches_per_epoch:
            self.epoch, self.step, self._perm = self.epoch + 1, 0, None
        first = (self.step * self.world_size + self.rank) * self.batch_size
        idx = self._permutation()[first:first + self.batch_size]
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        offsets = (idx - self.starts[shard]) * self.context
        rows = np.stack([self.arrays[s][o:o + self.context + 1] for s, o in zip(shard, offsets, strict=True)])
        rows = torch.from_numpy(rows.astype(np.int64))
        self.step += 1
        return rows[:, :-1], rows[:, 1:]

    def __iter__(self):
        while True:
            yield self.next_batch()


def tokenize_prepared(data: str | os.PathLike, tokenizer: Tokenizer | str | os.PathLike, out: str | os.PathLike,
                      workers: int | None = None, progress: bool = True) -> dict:
    """Shards for the train.jsonl / val.jsonl of a `prepare` folder: `out/train/`, `out/val/`."""
    from llmkit.data.prepare import read_documents

    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_pretrained(tokenizer)
    metas = {}
    for split in ("train", "val"):
        docs = read_documents(Path(data) / f"{split}.jsonl")
        if docs:
            metas[split] = write_shards((d.text for d in docs), tokenizer, Path(out) / split, workers=workers,
                                        progress=progress)
    return metas
