"""Resume under torch.distributed: two CPU processes (gloo) stopped after a checkpoint and restarted
give the losses of the uninterrupted two-process run, for DDP and for FSDP2.

The workers run the one training loop directly on token shards (the data pretraining reads), so the
checkpoint carries what every rank needs: the full model and optimizer state and the loader's position."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from llmkit.config import ModelConfig
from llmkit.data.corpora import documents
from llmkit.data.shards import ShardLoader, read_meta, write_shards
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer
from llmkit.train import distributed as dist_
from llmkit.train.loop import LoopConfig, train
from llmkit.train.objectives import causal_lm_loss

STEPS, STOP_AT = 8, 4
STRATEGIES = ("ddp", "fsdp")


class StopAfter(ShardLoader):
    """A loader whose process "dies" (KeyboardInterrupt) when asked for batch `stop_at + 1`."""

    stop_at: int | None = None

    def next_batch(self):
        served = getattr(self, "_served", 0)
        if served == self.stop_at:
            raise KeyboardInterrupt
        self._served = served + 1
        return super().next_batch()


def _run(rank: int, shards: str, out: str, strategy: str, *, resume: bool = False, stop_at: int | None = None,
         model_seed: int = 0) -> None:
    vocab = read_meta(shards)["vocab_size"]
    torch.manual_seed(model_seed)
    model = Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=vocab, d_model=32, d_ff=64, n_head=2,
                                                n_kv_head=1))
    data = StopAfter(shards, batch_size=2, context=32, seed=5, rank=rank, world_size=2)
    data.stop_at = stop_at
    config = LoopConfig(max_steps=STEPS, warmup_steps=2, lr=1e-2, save_every=STOP_AT, eval_every=0, progress=False,
                        resume=resume, seed=5, device="cpu")
    try:
        train(model, causal_lm_loss, data, config, out, strategy=strategy)
    except KeyboardInterrupt:
        assert stop_at is not None


def _worker(rank: int, port: int, shards: str, root: str, phase: str) -> None:
    """One rank: join the gloo group once, then run this phase's runs for both strategies in turn."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = dist_.init(torch.device("cpu"))
    try:
        for strategy in STRATEGIES:
            if phase == "first":
                _run(rank, shards, f"{root}/{strategy}-whole", strategy)
                _run(rank, shards, f"{root}/{strategy}-split", strategy, stop_at=STOP_AT)
            else:  # fresh processes, a different initial model: everything must come from the checkpoint
                _run(rank, shards, f"{root}/{strategy}-split", strategy, resume=True, model_seed=123)
    finally:
        dist_.shutdown(world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow  # ~25 s: two spawned processes start twice
def test_two_process_resume_equals_the_uninterrupted_run(tmp_path):
    docs = [d.text for d in documents("tinyshakespeare")][:3]
    tokenizer = Tokenizer.train_chars(docs)
    shards = tmp_path / "shards"
    write_shards(docs, tokenizer, shards, workers=1, progress=False)
    for phase in ("first", "resume"):
        mp.spawn(_worker, args=(_free_port(), str(shards), str(tmp_path), phase), nprocs=2, join=True)
    for strategy in STRATEGIES:
        whole = _losses(tmp_path / f"{strategy}-whole")
        assert len(whole) == STEPS
        kept = sorted(p.name for p in (tmp_path / f"{strategy}-split" / "checkpoints").iterdir())
        assert kept == ["latest", f"step-{STOP_AT:07d}", f"step-{STEPS:07d}"], strategy
        # bit-identical: the same two processes, the same reduction order, restored state
        assert _losses(tmp_path / f"{strategy}-split") == whole, strategy
