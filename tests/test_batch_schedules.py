"""Batch-shape schedules of the one loop: sequence-length warmup (a window cut into shorter rows, the same
tokens per step) and batch-size warmup (a step's first rows, growing), as pure functions and in a real
pretraining run on the packaged Shakespeare shards; bad values refused by name."""

import json

import pytest
import torch
from test_pretrain import tiny

from llmkit.errors import ConfigError
from llmkit.train import pretrain
from llmkit.train.schedules import batch_shape, check_batch_schedule, rows_at, seq_len_at


def test_sequence_length_doubles_in_equal_parts_of_the_warmup():
    lengths = [seq_len_at(p / 100, 256, 64, 0.3) for p in range(101)]
    assert lengths[:10] == [64] * 10 and lengths[10:20] == [128] * 10 and set(lengths[20:]) == {256}
    assert seq_len_at(0.0, 256, 64, 0.0) == 256 and seq_len_at(0.0, 64, 64, 0.5) == 64


def test_rows_grow_linearly_from_batch_start():
    assert [rows_at(p, 16, 0.25, 0.5) for p in (0.0, 0.125, 0.25, 0.375, 0.5, 0.9)] == [4, 7, 10, 13, 16, 16]
    assert rows_at(0.0, 2, 0.1, 1.0) == 1  # never an empty step


def test_batch_shape_cuts_rows_and_keeps_targets_aligned():
    tokens = torch.arange(4 * 17).reshape(4, 17)
    x, y = tokens[:, :-1], tokens[:, 1:]  # (4, 16) windows and their next tokens, as ShardLoader gives them
    sx, sy = batch_shape((x, y), 0.0, 4, 0.5, 0.5, 0.5)  # rows 2 of 4, sequences 4 of 16
    assert sx.shape == sy.shape == (8, 4)
    assert torch.equal(sy, sx + 1)  # every target is still its input's next token
    assert torch.equal(sx.reshape(2, 16), x[:2])  # the same tokens, in order
    fx, fy = batch_shape((x, y), 0.6, 4, 0.5, 0.5, 0.5)  # past both warmups: untouched
    assert torch.equal(fx, x) and torch.equal(fy, y)
    # a start at or above the context (the speedrun's 64 under a 32- or 64-token context): the context throughout
    check_batch_schedule(64, 0.3, 1.0, 0.0, context=16)
    lx, ly = batch_shape((x, y), 0.0, 16, 0.5, 1.0, 0.0)
    assert torch.equal(lx, x) and torch.equal(ly, y)


def test_bad_schedules_are_refused(shakespeare_shards, tmp_path):
    with pytest.raises(ConfigError, match="seq_start=48 must divide the context 64 by a power of two"):
        pretrain.run(tiny(shakespeare_shards, tmp_path / "a", seq_warmup=0.5, seq_start=48))
    with pytest.raises(ConfigError, match=r"batch_warmup=1.5 is the share of training it lasts"):
        pretrain.run(tiny(shakespeare_shards, tmp_path / "b", batch_warmup=1.5))
    with pytest.raises(ConfigError, match="batch_start=0 is the share of the rows"):
        pretrain.run(tiny(shakespeare_shards, tmp_path / "c", batch_warmup=0.5, batch_start=0))
    with pytest.raises(ConfigError, match="cannot cut this batch's 12-token rows into rows of 8"):
        batch_shape((torch.zeros(2, 12), torch.zeros(2, 12)), 0.0, 8, 0.5, 1.0, 0.0)
    with pytest.raises(ConfigError, match="token batches \\(x, y\\) of pretraining; this objective's batches are dicts"):
        batch_shape({"input_ids": torch.zeros(2, 4)}, 0.0, 2, 0.5, 1.0, 0.0)


def test_a_pretraining_run_follows_both_schedules(shakespeare_shards, tmp_path):
    """20 steps of 8 x 64 tokens: sequences 16, 32 then 64 over the first half, rows 2 growing to 8 over the
    first 40 %; the model sees exactly those shapes, tokens_seen counts what it read, and it still learns."""
    shapes = []
    original = torch.nn.Module.__call__

    def spy(module, *args, **kwargs):
        if type(module).__name__ == "Transformer" and module.training and args:
            shapes.append(tuple(args[0].shape))
        return original(module, *args, **kwargs)

    torch.nn.Module.__call__ = spy
    try:
        pretrain.run(tiny(shakespeare_shards, tmp_path, seq_warmup=0.5, seq_start=16, batch_warmup=0.4,
                          batch_start=0.25, eval_every=0))
    finally:
        torch.nn.Module.__call__ = original
    expected = [(rows_at(s / 20, 8, 0.25, 0.4) * 64 // seq_len_at(s / 20, 64, 16, 0.5), seq_len_at(s / 20, 64, 16, 0.5))
                for s in range(20)]
    assert shapes == expected
    assert [s[1] for s in shapes[:4]] == [16] * 4 and shapes[-1] == (8, 64) and shapes[0] == (8, 16)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["tokens_seen"] for r in steps] == list(torch.tensor([r * s for r, s in expected]).cumsum(0).tolist())
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
