"""The fused LM head + cross-entropy (`llmkit.losses`) equals logits followed by F.cross_entropy:
loss and gradients, with ignored positions, any chunking, tied and untied heads, under autocast,
and it never allocates the tokens x vocab logits."""

import math

import pytest
import torch
import torch.nn.functional as F

import llmkit.losses as losses
from llmkit import ModelConfig, Transformer
from llmkit.data.collate import IGNORE_INDEX
from llmkit.losses import linear_cross_entropy
from llmkit.train.objectives import causal_lm_loss


def reference(hidden, weight, labels):
    logits = hidden @ weight.t()
    logits = logits.float() if logits.dtype == torch.bfloat16 else logits
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


def loss_and_grads(fn, hidden, weight, labels):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, labels)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def test_a_two_token_example_by_hand():
    # identity weights make the hidden states the logits: vocab 3, targets 1 and 2
    hidden = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    loss = linear_cross_entropy(hidden, torch.eye(3), torch.tensor([1, 2]))
    by_hand = (-(0 - math.log(math.exp(2) + 1 + math.exp(-1))) - (3 - math.log(2 * math.exp(0.5) + math.exp(3)))) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("rows", [7, 64, 10_000])  # ragged chunks, even chunks, one chunk
def test_equals_logits_then_cross_entropy(monkeypatch, rows):
    monkeypatch.setattr(losses, "_chunk_rows", lambda vocab, device: rows)
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 50, 32, generator=g), torch.randn(300, 32, generator=g) * 0.3
    labels = torch.randint(0, 300, (3, 50), generator=g)
    labels[0, :20] = IGNORE_INDEX  # a prompt that is not scored
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, labels)
    theirs = loss_and_grads(reference, hidden, weight, labels)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_float64_stays_float64():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(40, 16, generator=g, dtype=torch.float64), torch.randn(100, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 100, (40,), generator=g)
    for a, b in zip(loss_and_grads(linear_cross_entropy, hidden, weight, labels),
                    loss_and_grads(reference, hidden, weight, labels), strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("preset, changes", [
    ("llama-tiny", {}),  # tied head
    ("llama-tiny", {"tie_embeddings": False}),
    ("gpt2", {"n_layer": 2, "n_head": 4, "d_model": 64, "d_ff": 256, "max_seq_len": 64}),  # learned positions, biases
])
def test_model_loss_from_labels_equals_cross_entropy_of_its_logits(preset, changes):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset, vocab_size=256, **changes)).train()
    x = torch.randint(0, 256, (2, 24))
    y = torch.roll(x, -1, 1)
    y[1, :5] = IGNORE_INDEX
    expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = model(x, labels=y)
    (loss * 0.25).backward()  # the loop scales by 1 / grad_accum: the gradient follows the scale
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 0.25 * grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_rewritten_head_falls_back_to_its_own_logits():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=256))
    model.lm_head = torch.nn.Linear(model.config.d_model, 256, bias=True)  # e.g. a head LoRA or quantization replaced
    x = torch.randint(0, 256, (2, 16))
    y = torch.roll(x, -1, 1)
    y[0, :3] = IGNORE_INDEX
    expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(model(x, labels=y), expected)
    loss, metrics = causal_lm_loss(model, (x, y))
    torch.testing.assert_close(loss, expected)
    assert metrics["tokens"].item() == 32 - 3


def test_under_bf16_autocast_it_is_as_close_to_fp32_as_the_unfused_path():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(256, 64, generator=g), torch.randn(1000, 64, generator=g) * 0.2
    labels = torch.randint(0, 1000, (256,), generator=g)
    exact = loss_and_grads(reference, hidden, weight, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_and_grads(linear_cross_entropy, hidden, weight, labels)
        unfused = loss_and_grads(reference, hidden, weight, labels)
    for f, u, e in zip(fused, unfused, exact, strict=True):
        assert f.dtype == e.dtype  # gradients come back in the inputs' dtype
        fused_error, unfused_error = (((t.float() - e).norm() / e.norm()).item() for t in (f, u))
        assert fused_error <= 1.5 * unfused_error + 1e-6, (fused_error, unfused_error)


def test_it_never_allocates_the_logits():
    hidden, weight = torch.randn(2048, 64, requires_grad=True), torch.randn(4096, 64, requires_grad=True)
    labels = torch.randint(0, 4096, (2048,))
    logits_bytes = 2048 * 4096 * 4
    with torch.profiler.profile(profile_memory=True) as prof:
        linear_cross_entropy(hidden, weight, labels).backward()
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest <= logits_bytes / 4, biggest
    with torch.profiler.profile(profile_memory=True) as prof:  # the check can see the unfused allocation
        reference(hidden, weight, labels).backward()
    assert max(e.cpu_memory_usage for e in prof.events()) >= logits_bytes


def test_no_scored_position_is_nan_as_in_torch_and_bad_shapes_are_refused():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    labels = torch.full((4,), IGNORE_INDEX)
    assert math.isnan(linear_cross_entropy(hidden, weight, labels).item())
    assert math.isnan(reference(hidden, weight, labels).item())
    with pytest.raises(ValueError, match=r"labels have shape \(3,\); expected \(4,\)"):
        linear_cross_entropy(hidden, weight, torch.zeros(3, dtype=torch.long))


def test_only_the_gradients_that_are_needed_are_computed(monkeypatch):
    monkeypatch.setattr(losses, "_chunk_rows", lambda vocab, device: 16)
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(64, 32, generator=g), torch.randn(200, 32, generator=g)
    labels = torch.randint(0, 200, (64,), generator=g)

    def matmuls(fn):
        with torch.profiler.profile() as prof:
            fn()
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm_"))

    with torch.no_grad():  # evaluation: the logits of 4 chunks, nothing else
        h = hidden.clone().requires_grad_()
        assert matmuls(lambda: linear_cross_entropy(h, weight, labels)) == 4
        torch.testing.assert_close(linear_cross_entropy(h, weight, labels), reference(hidden, weight, labels))
    frozen_head = weight.clone()  # e.g. LoRA: the head is frozen, the hidden states are not
    h = hidden.clone().requires_grad_()
    assert matmuls(lambda: linear_cross_entropy(h, frozen_head, labels).backward()) == 8
    h_ref = hidden.clone().requires_grad_()
    reference(h_ref, frozen_head, labels).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-7)
    assert frozen_head.grad is None


def test_the_logits_path_upcasts_half_precision_and_keeps_float64():
    class Fixed(torch.nn.Module):  # not a Transformer: causal_lm_loss takes its logits
        def __init__(self, dtype):
            super().__init__()
            self.dtype = dtype

        def forward(self, x):
            return torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]], dtype=self.dtype)

    x, y = torch.tensor([[0, 1]]), torch.tensor([[1, 2]])
    assert causal_lm_loss(Fixed(torch.float64), (x, y))[0].dtype == torch.float64
    assert causal_lm_loss(Fixed(torch.bfloat16), (x, y))[0].dtype == torch.float32


def _vocabulary_parallel_worker(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2 (gloo): the head split by vocabulary rows over a "tp" mesh, in float64, in chunks
    of 7 rows; writes its loss, the hidden states' gradient and its rows of the head's gradient."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        losses._chunk_rows = lambda vocab, device: 7
        hidden, weight, labels, cap = _vocabulary_parallel_case()
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        w = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
        h = hidden.clone().requires_grad_()
        results = {}
        for name, softcap in (("plain", None), ("capped", cap)):
            h.grad = w.grad = None
            loss = linear_cross_entropy(h, w, labels, softcap=softcap)
            loss.backward()
            results[name] = (loss.detach(), h.grad.clone(), w.grad.to_local().clone())
        with torch.no_grad():  # evaluation: the loss alone, the same collectives
            results["no_grad"] = linear_cross_entropy(h, w, labels)
        other = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
        try:
            linear_cross_entropy(h, torch.nn.Parameter(distribute_tensor(weight, other, [Shard(0)])), labels)
        except ValueError as e:
            results["refused"] = str(e)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _vocabulary_parallel_case():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 23, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(60, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 60, (2, 23), generator=g)
    labels[0, :5] = IGNORE_INDEX
    labels[1, :3] = torch.tensor([0, 29, 30])  # the first row of each rank's half and the last of the first
    return hidden, weight, labels, 2.5


def test_vocabulary_parallel_equals_the_whole_head(tmp_path):
    """Megatron's vocabulary-parallel cross-entropy on 2 processes: each holds 30 of the 60 rows of the head,
    and its loss, the hidden states' gradient and its rows of the head's gradient equal the whole head's
    in one process, in float64 (to 1e-12: only the order of a few sums differs), with and without a
    soft-cap and across chunks; a head sharded over another mesh dimension is refused by name."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_vocabulary_parallel_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    hidden, weight, labels, cap = _vocabulary_parallel_case()
    for name, softcap in (("plain", None), ("capped", cap)):
        def whole(h, w, y, softcap=softcap):
            logits = h @ w.t()
            logits = logits if softcap is None else softcap * torch.tanh(logits / softcap)
            return F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=IGNORE_INDEX)

        loss, grad_hidden, grad_weight = loss_and_grads(whole, hidden, weight, labels)
        for rank in range(2):
            ours = torch.load(tmp_path / f"rank{rank}.pt")
            torch.testing.assert_close(ours[name][0], loss, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ours[name][1], grad_hidden, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ours[name][2], grad_weight[30 * rank:30 * (rank + 1)], rtol=1e-12, atol=1e-12)
            if name == "plain":
                torch.testing.assert_close(ours["no_grad"], loss, rtol=1e-12, atol=1e-12)
                assert "tensor-parallel mesh dimension" in ours["refused"] and "dp_shard" in ours["refused"]
