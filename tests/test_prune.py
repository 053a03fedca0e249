"""Unstructured pruning: exact sparsity patterns, Wanda's scores by hand, and one clear error per bad input."""

import pytest
import torch
import torch.nn as nn

from llmkit import ModelConfig, Transformer
from llmkit.errors import ConfigError
from llmkit.quant.calibrate import calibrate
from llmkit.quant.prune import mask_for, prune, scores


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("llama-tiny")).eval()


def batches(n=2, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (1, seq), generator=g) for _ in range(n)]


def test_two_four_leaves_exactly_two_zeros_in_every_group_of_four_along_the_input_dim():
    model = tiny_model()
    stats = calibrate(model, batches())
    prune(model, "wanda", n_m="2:4", calibration=stats)
    for name, m in model.blocks.named_modules():
        if isinstance(m, nn.Linear):
            zeros = (m.weight == 0).reshape(m.out_features, m.in_features // 4, 4).sum(-1)
            assert (zeros == 2).all(), name


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_sparsity_is_exact_and_keeps_the_highest_scores(method):
    model = tiny_model()
    stats = calibrate(model, batches())
    before = {n: m.weight.clone() for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)}
    achieved = prune(model, method, 0.5, calibration=stats)
    for name, w0 in before.items():
        w = dict(model.blocks.named_modules())[name].weight
        score = scores(w0, method, stats.norm("blocks." + name))
        if method == "wanda":  # half of every output row, the lowest scores of that row
            assert ((w == 0).sum(1) == w.shape[1] // 2).all()
            cut = score.sort(1).values[:, w.shape[1] // 2 - 1:w.shape[1] // 2 + 1]
            assert (score[w == 0].reshape(w.shape[0], -1).amax(1) <= cut[:, 1]).all()
        else:  # half of the layer, the lowest magnitudes anywhere in it
            assert int((w == 0).sum()) == w.numel() // 2
            assert score[w == 0].max() <= score[w != 0].min()
        assert achieved["blocks." + name] == pytest.approx(0.5)
        torch.testing.assert_close(w[w != 0], w0[w != 0], rtol=0, atol=0)  # kept weights untouched


def test_wanda_scores_equal_a_hand_computation_on_a_tiny_layer():
    # Two tokens through a 2x3 layer: ||X_j|| = sqrt(sum_t x_tj^2) = [5, 1, 0.5]
    x = torch.tensor([[3.0, 1.0, 0.0], [4.0, 0.0, 0.5]])
    w = torch.tensor([[0.1, -0.4, 2.0], [-0.3, 0.2, -1.0]])
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].proj = nn.Linear(3, 2, bias=False)
    model.blocks[0].proj.weight.data = w.clone()
    model.hidden_states = lambda ids: model.blocks[0].proj(x)
    stats = calibrate(model, [torch.zeros(1, 2, dtype=torch.long)])
    torch.testing.assert_close(stats.norm("blocks.0.proj"), torch.tensor([5.0, 1.0, 0.5], dtype=torch.float64))
    expected = torch.tensor([[0.1 * 5, 0.4 * 1, 2.0 * 0.5], [0.3 * 5, 0.2 * 1, 1.0 * 0.5]])
    score = scores(w, "wanda", stats.norm("blocks.0.proj"))
    torch.testing.assert_close(score, expected)
    # per output row, one of three pruned: row 0 loses -0.4 (0.4), row 1 loses 0.2 (0.2); magnitude differs
    keep = mask_for(score, 1 / 3 + 1e-6, "wanda")
    assert keep.tolist() == [[True, False, True], [True, False, True]]
    assert mask_for(scores(w, "magnitude"), 2 / 6, "magnitude").tolist() == [[False, True, True], [True, False, True]]


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_zero_one_is_refused_naming_the_value(sparsity):
    with pytest.raises(ConfigError, match=rf"sparsity={sparsity}; expected a fraction in \[0, 1\)"):
        prune(tiny_model(), "magnitude", sparsity)


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "0:4"])
def test_n_m_with_n_not_below_m_is_refused(pattern):
    with pytest.raises(ConfigError, match=rf"N:M pattern {pattern}; expected 0 < N < M"):
        prune(tiny_model(), "magnitude", n_m=pattern)


def test_other_bad_inputs_are_refused_by_name():
    with pytest.raises(ConfigError, match="pruning method 'random'"):
        prune(tiny_model(), "random")
    with pytest.raises(ConfigError, match="Wanda needs calibration"):
        prune(tiny_model(), "wanda")
    with pytest.raises(ConfigError, match="3 per-layer sparsities for a model of 2 layers"):
        prune(tiny_model(), "magnitude", [0.1, 0.2, 0.3])
