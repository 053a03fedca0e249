"""Muon (torch.optim.Muon on the blocks' matrices, AdamW on the rest) as the loop's optimizer: the
Newton–Schulz step checked by hand, the parameter split, exact resume. (FSDP2 on two processes against
one: tests/test_parallel.py, run "muon-fsdp".)"""

import pytest
import torch
from test_train_loop import RandomWindows, StopAfter6, quiet, text_tokens, tiny_model

from llmkit.errors import ConfigError
from llmkit.train import checkpoint, optimizers
from llmkit.train.loop import LoopConfig, train
from llmkit.train.objectives import causal_lm_loss

A, B, C = 3.4445, -4.7750, 2.0315  # the quintic's coefficients (Keller Jordan's, torch's defaults)


def _newton_schulz_by_hand(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """X <- aX + (bA + cA^2)X with A = XX^T, from X = G / ||G||_F, on the wide orientation, in float64."""
    x = g.double().T / g.double().norm()
    for _ in range(steps):
        a = x @ x.T
        x = A * x + (B * a + C * a @ a) @ x
    return x.T


def test_a_muon_step_is_the_orthogonalised_gradient():
    torch.manual_seed(0)
    g = torch.randn(12, 6) @ torch.diag(torch.logspace(0, 2, 6))  # singular values spread ~200x
    weight = torch.nn.Parameter(torch.zeros(12, 6))
    step = optimizers.MuonAdamW([{"params": [weight], "algorithm": "muon", "weight_decay": 0.0}], lr=0.0,
                                muon_lr=1.0, momentum=0.0)
    weight.grad = g.clone()
    step.step()
    update = -weight.detach().double() / 2 ** 0.5  # torch's "original" lr scale: sqrt(max(1, rows / cols))
    # torch iterates in bfloat16 (8 significant bits, 2^-8 relative per rounding, over 5 iterations);
    # measured 0.010 at entries of up to 0.74
    torch.testing.assert_close(update, _newton_schulz_by_hand(g), rtol=0, atol=0.02)
    # orthogonal up to the quintic's band: singular values near 1 (measured 0.69-1.15) where G's spread 200x
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.6 and s.max() < 1.2, s
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    polar = u @ vh  # the exact orthogonal factor of G
    assert (update * polar).sum() / (update.norm() * polar.norm()) > 0.97


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    groups = optimizers.param_groups(model, 0.1, muon=True)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in groups if g["algorithm"] == "muon" for p in g["params"]}
    adam = {names[id(p)] for g in groups if g["algorithm"] == "adamw" for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert "embed.weight" in adam and all("norm" in n or not n.startswith("blocks.") for n in adam)
    assert muon.isdisjoint(adam) and muon | adam == set(names.values())
    optimizer = optimizers.build(model, "muon", lr=1e-3, weight_decay=0.1, muon_lr=0.02)
    assert sorted({g["initial_lr"] for g in optimizer.param_groups}) == [1e-3, 0.02]


def test_muon_trains_and_resumes_bit_for_bit(tmp_path):
    tokens = text_tokens()
    muon = dict(optimizer="muon", lr=5e-3, muon_lr=0.02)
    full = train(tiny_model(), causal_lm_loss, RandomWindows(tokens, 4, 32),
                 quiet(max_steps=12, warmup_steps=3, **muon), tmp_path / "full")
    losses = [r["loss"] for r in full.history if "loss" in r]
    assert losses[-1] < losses[0] - 1.0

    config = LoopConfig(max_steps=12, warmup_steps=3, save_every=6, eval_every=0, progress=False, **muon)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), causal_lm_loss, StopAfter6(tokens, 4, 32), config, tmp_path / "split")
    config.resume = True
    model = tiny_model(seed=123)
    resumed = train(model, causal_lm_loss, RandomWindows(tokens, 4, 32, seed=99), config, tmp_path / "split")
    assert [r["loss"] for r in resumed.history if "loss" in r] == losses  # momentum buffers restored too
    reference = checkpoint.load_state(checkpoint.latest(tmp_path / "full"))[1]
    again = checkpoint.load_state(checkpoint.latest(tmp_path / "split"))[1]
    assert reference["state"].keys() == again["state"].keys()
    for key, moments in reference["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, again["state"][key][name]), (key, name)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match=r"optimizer='sgd'; expected one of \('adamw', 'muon'\)"):
        LoopConfig(optimizer="sgd").validate()
