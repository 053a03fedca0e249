"""Tensor, sequence and pipeline parallel, and TP x FSDP2 (2D), on CPU processes with gloo: each run equals
one process training the same global batches.

A tiny Llama (llama-tiny: 2 layers, 4 heads, 2 KV heads, d_model 64) trains 8 fp32 steps on fixed random
token batches of 4 sequences. The reference is the same loop in this process. Every parallel run must give
the same 8 losses and, after the last step, the same weights (its checkpoint, gathered to an HF folder).

Tolerance 1e-5: the split matmuls add partial sums in another order (TP's all-reduce, FSDP's
reduce-scatter), about 1e-7 relative in fp32. AdamW divides each update by the gradient's running RMS, so
a weight's update carries its gradient's relative error times lr; with lr 1e-3 over 8 steps that stays
below 1e-5 (measured: losses 1e-6, weights 3e-6; at lr 1e-2 weights drift 2.6e-5 for that reason, not a bug).
"""

import json
import os
import re
import socket

import pytest
import torch
import torch.multiprocessing as mp

from llmkit.analysis.accounting import parallel_costs
from llmkit.config import ModelConfig
from llmkit.errors import ConfigError
from llmkit.model import Transformer
from llmkit.train import distributed as dist_
from llmkit.train import parallel
from llmkit.train.loop import LoopConfig, train
from llmkit.train.objectives import causal_lm_loss

STEPS, BATCH, CONTEXT, STOP_AT, TOL = 8, 4, 16, 4, 1e-5
TWO = {"tp": dict(tp=2), "sp": dict(tp=2, sp=True), "pp-1f1b": dict(pp=2, pp_microbatches=4),
       "pp-gpipe": dict(pp=2, pp_microbatches=4, pp_schedule="GPipe"), "hsdp": dict(dp_replicate=2),
       # attention split, the MoE blocks whole on each rank. AdamW's eps 1e-3: mixtral-2m has gradients of
       # about 0 (the tied embedding's 7,680 unused rows, idle experts) whose sign, and so their update of
       # +-lr, the summation order decides at eps 1e-8 (weights 1.6e-3 apart); 1e-3 damps those updates
       # (measured: losses equal, weights 1.2e-7 apart)
       "moe-tp": dict(tp=2, preset="mixtral-2m", eps=1e-3),
       "moe-ep": dict(ep=2, preset="mixtral-2m", eps=1e-3),  # each rank 4 of the 8 experts
       # Muon under FSDP2: each matrix gathered, orthogonalised whole, re-sharded. Both ranks read the whole
       # batch and nothing is clipped, so each gradient is the one process's to the bit (the mean of two equal
       # ones) and so must the weights be (measured: equal). Split batches or a clip factor from a sharded norm
       # differ by 1e-7, and torch's Newton-Schulz, in bf16 with a slope of 3.4 at zero, turns that into
       # flipped roundings: weights 2e-3 apart after 8 steps at Muon's lr 0.02, hiding the step under test
       "muon-fsdp": dict(dp_shard=2, optimizer="muon", same_batch=True, grad_clip=0.0)}
FOUR = {"tp2xfsdp2": dict(tp=2, dp_shard=2), "tp2xpp2": dict(tp=2, pp=2, pp_microbatches=4),
        "pp2xfsdp2": dict(pp=2, dp_shard=2, pp_microbatches=2)}


class Batches:
    """STEPS fixed global batches of random tokens; a rank reads rows of its data-parallel slice. A run
    "dies" (KeyboardInterrupt) when asked for batch `stop_at + 1`."""

    def __init__(self, rank: int = 0, count: int = 1, stop_at: int | None = None):
        generator = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, 512, (STEPS, BATCH, CONTEXT + 1), generator=generator)
        self.rank, self.count, self.step, self.stop_at = rank, count, 0, stop_at

    def next_batch(self):
        if self.step == self.stop_at:
            raise KeyboardInterrupt
        n = BATCH // self.count
        part = self.rows[self.step, self.rank * n:(self.rank + 1) * n]
        self.step += 1
        return part[:, :-1], part[:, 1:]

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def _run(out, rank=0, world_size=1, *, stop_at=None, resume=False, model_seed=0, preset="llama-tiny",
         same_batch=False, **sizes):
    torch.manual_seed(model_seed)
    model = Transformer(ModelConfig.from_preset(preset))
    config = LoopConfig(max_steps=STEPS, warmup_steps=2, lr=1e-3, save_every=STOP_AT, eval_every=0, progress=False,
                        seed=5, device="cpu", precision="fp32", resume=resume, **sizes)
    layout = parallel.check(config, model.config, world_size, BATCH, CONTEXT) if parallel.active(config) else None
    reader = parallel.data_slice(layout, rank) if layout and not same_batch else (0, 1)
    try:
        train(model, causal_lm_loss, Batches(*reader, stop_at=stop_at), config, out)
    except KeyboardInterrupt:
        assert stop_at is not None
    return model


def _worker(rank: int, port: int, root: str, runs: dict, world_size: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = dist_.init(torch.device("cpu"))
    try:
        memory = {}
        for name, sizes in runs.items():
            memory[name] = parallel.parameter_bytes(_run(f"{root}/{name}", rank, world_size, **sizes))
        if "tp" in runs:  # killed after step 4, then a new model (another seed) resumes from the checkpoint
            _run(f"{root}/tp-split", rank, world_size, stop_at=STOP_AT, tp=2)
            _run(f"{root}/tp-split", rank, world_size, resume=True, model_seed=123, tp=2)
            _run(f"{root}/pp-split", rank, world_size, stop_at=STOP_AT, pp=2, pp_microbatches=4)
            _run(f"{root}/pp-split", rank, world_size, resume=True, model_seed=123, pp=2, pp_microbatches=4)
        with open(f"{root}/memory-{world_size}-{rank}.json", "w") as f:
            json.dump(memory, f)
    finally:
        dist_.shutdown(world)


def _spawn(root, runs, world_size):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(root), runs, world_size), nprocs=world_size, join=True)


def _losses(folder):
    return [r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _weights(folder):
    return Transformer.from_pretrained(folder / "checkpoints" / f"step-{STEPS:07d}").state_dict()


def _assert_same_run(reference, run):
    ours, theirs = _losses(reference), _losses(run)
    assert len(theirs) == STEPS, run.name
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < TOL, (run.name, ours, theirs)
    a, b = _weights(reference), _weights(run)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < TOL, run.name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    model = _run(root / "run")
    _run(root / "mixtral-2m", preset="mixtral-2m", eps=1e-3)
    _run(root / "muon", optimizer="muon", grad_clip=0.0)
    return root / "run", parallel.parameter_bytes(model)


def test_tp_sp_and_pp_on_two_processes_equal_one_process(reference, tmp_path):
    single, single_bytes = reference
    _spawn(tmp_path, TWO, 2)
    for name, sizes in TWO.items():
        _assert_same_run(single.parent / sizes.get("preset", sizes.get("optimizer", "run")), tmp_path / name)
    # kill and resume under tp=2 (and pp=2): the same curve as the uninterrupted run, bit for bit
    kept = sorted(p.name for p in (tmp_path / "tp-split" / "checkpoints").iterdir())
    assert kept == ["latest", f"step-{STOP_AT:07d}", f"step-{STEPS:07d}"]
    assert _losses(tmp_path / "tp-split") == _losses(tmp_path / "tp")
    assert _losses(tmp_path / "pp-split") == _losses(tmp_path / "pp-1f1b")  # and under pp=2
    # parameter memory per rank: pp splits everything; tp everything but the norms (0.1 % of llama-tiny): the
    # blocks' linears, the embedding and the LM head (the loss runs vocabulary-parallel on its rows)
    memory = [json.loads((tmp_path / f"memory-2-{r}.json").read_text()) for r in range(2)]
    assert sum(m["pp-1f1b"] for m in memory) == single_bytes  # the stages hold disjoint pieces
    assert max(m["pp-1f1b"] for m in memory) < 0.51 * single_bytes
    norms = (2 * 2 + 1) * 64 * 4
    assert max(m["tp"] for m in memory) == (single_bytes - norms) / 2 + norms
    # llmkit's accounting (docs/parallelism.md's table) predicts these counts exactly
    llama = ModelConfig.from_preset("llama-tiny")
    for name, sizes in (("tp", dict(tp=2)), ("pp-1f1b", dict(pp=2))):
        assert max(m[name] for m in memory) == 4 * parallel_costs(llama, **sizes)["parameters_per_rank"], name
    mixtral = ModelConfig.from_preset("mixtral-2m")  # under tp: the attention and the tied embedding split
    assert max(m["moe-tp"] for m in memory) == 4 * parallel_costs(mixtral, tp=2)["parameters_per_rank"]
    assert max(m["moe-ep"] for m in memory) == 4 * parallel_costs(mixtral, ep=2)["parameters_per_rank"]
    assert max(m["moe-ep"] for m in memory) < 0.68 * 4 * parallel_costs(mixtral)["parameters_per_rank"]  # experts 65 %


def test_2d_meshes_on_four_processes_equal_one_process_and_tp_by_fsdp_loads_in_transformers(reference, tmp_path):
    import transformers

    single, single_bytes = reference
    _spawn(tmp_path, FOUR, 4)
    for name in FOUR:
        _assert_same_run(single, tmp_path / name)
    memory = [json.loads((tmp_path / f"memory-4-{r}.json").read_text())["tp2xfsdp2"] for r in range(4)]
    # everything split 4 ways (tp x dp_shard) but the norms, split 2 ways (FSDP only)
    norms = (2 * 2 + 1) * 64 * 4
    assert max(memory) == (single_bytes - norms) / 4 + norms / 2, memory
    costs = parallel_costs(ModelConfig.from_preset("llama-tiny"), tp=2, dp_shard=2)
    assert max(memory) == 4 * costs["parameters_per_rank"]
    folder = tmp_path / "tp2xfsdp2" / "checkpoints" / f"step-{STEPS:07d}"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(folder).eval()
    ids = Batches().rows[0, :, :-1]
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-5)


def test_bad_sizes_fail_before_any_compute(tmp_path):
    llama = ModelConfig.from_preset("llama-tiny")  # 4 heads, 2 KV heads, 2 layers, d_ff 192
    bad = [
        (dict(tp=2, dp_shard=2), 2, "= 4, but the world size is 2"),
        (dict(tp=2, pp=2), 2, "= 4 does not divide the world size 2"),
        (dict(tp=3), 4, "does not divide the world size 4"),
        (dict(tp=4), 4, "key/value heads (2)"),
        (dict(tp=8), 8, "attention heads (4)"),
        (dict(pp=4), 4, "the model has 2 layers"),
        (dict(sp=True), 2, "needs tp > 1"),
        (dict(pp=2, pp_microbatches=3), 2, "cannot be cut into pp_microbatches=3"),
        (dict(pp=2, pp_schedule="zero-bubble"), 2, "pp_schedule"),
        (dict(cp=2), 2, "context parallel is not built"),
        (dict(ep=2), 2, "ep=2 must divide the experts of a mixture-of-experts model (this one has n_experts=0)"),
        (dict(dp_shard=0), 2, "dp_shard must be"),
    ]
    for sizes, world, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parallel.check(parallel.ParallelConfig(**sizes), llama, world, BATCH, CONTEXT)
    with pytest.raises(ConfigError, match=re.escape("x 2 = 4 does not divide the world size 2")):
        parallel.check(parallel.ParallelConfig(ep=2, tp=2), ModelConfig.from_preset("mixtral-2m"), 2)
    with pytest.raises(ConfigError, match="tied embeddings"):
        parallel.check(parallel.ParallelConfig(pp=2), ModelConfig.from_preset("llama-2m"), 2)
    with pytest.raises(ConfigError, match=re.escape("tp=2 must divide the vocabulary (511)")):
        parallel.check(parallel.ParallelConfig(tp=2), llama.replace(vocab_size=511), 2)
    # through the loop on one process: the error comes before a step or a file
    config = LoopConfig(max_steps=STEPS, progress=False, device="cpu", tp=2)
    with pytest.raises(ConfigError, match="does not divide the world size 1"):
        train(Transformer(llama), causal_lm_loss, Batches(), config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert parallel.check(parallel.ParallelConfig(tp=2, pp=2), llama, 8).dp_shard == 2  # -1: the rest


def test_data_slices_follow_the_mesh_order():
    layout = parallel.check(parallel.ParallelConfig(tp=2, dp_shard=2, pp=2), ModelConfig.from_preset("llama-tiny"), 8)
    # ranks = arange(8).view(pp=2, 1, dp_shard=2, tp=2): tp pairs and both stages share a slice
    assert [parallel.data_slice(layout, r)[0] for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [list(parallel.stage_layers(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]


def test_parallel_costs_by_hand():
    llama = ModelConfig.from_preset("llama-tiny")  # a block: 12,288 attention + 36,864 MLP + 128 norm weights
    params = 2 * (12_288 + 36_864 + 128) + 2 * 512 * 64 + 64
    fsdp = parallel_costs(llama, dp_shard=2, seq_len=16)
    assert fsdp["parameters_per_rank"] == params // 2
    assert fsdp["state_bytes"] == params // 2 * (2 + 2 + 8)  # bf16 weights and gradients, fp32 AdamW moments
    assert fsdp["traffic_bytes"]["dp_shard"] == 0.5 * params * (2 * 2 + 2)  # gather twice, reduce-scatter once
    tp = parallel_costs(llama, tp=2, seq_len=16, micro_batch=3)
    # 2 all-reduces of the residual stream per block forward, 2 backward, 1 after the split embedding, 1 of the
    # hidden states' gradient from the vocabulary-parallel loss; ring: 2 (n-1)/n of the bytes each
    assert tp["traffic_bytes"]["tp"] == (4 * 2 + 2) * 1.0 * (3 * 16 * 64 * 2)
    assert tp["parameters_per_rank"] == 2 * (12_288 + 36_864) // 2 + 2 * 128 + 2 * 512 * 64 // 2 + 64
    # under pp the last stage gathers the logits (vocabulary 512) forward and reduce-scatters them backward
    tp_pp = parallel_costs(llama, tp=2, pp=2, microbatches=2, seq_len=16)
    assert tp_pp["traffic_bytes"]["tp"] == 2 * (4 * 1.0 * 16 * 64 * 2 + 2 * 0.5 * 16 * 512 * 2)
    pp = parallel_costs(llama, pp=2, microbatches=4, seq_len=16)
    assert pp["traffic_bytes"]["pp"] == 2 * (16 * 64 * 2) * 4  # activations forward, their gradients back
