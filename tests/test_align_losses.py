"""The alignment and distillation losses against hand computations (and trl's DPO/IPO on the same
log-probs). Expected values are worked out in the comments, not produced by the code under test."""

import math
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from llmkit import losses as align
from llmkit.data.collate import IGNORE_INDEX
from llmkit.errors import ConfigError
from llmkit.train.ppo import AdaptiveKLController

TOL = dict(rtol=0, atol=1e-6)


def close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), **TOL)


def test_bradley_terry_by_hand():
    # margins 1 and 0: mean(log(1 + e^-1), log 2) = mean(0.3132617, 0.6931472)
    loss = align.bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    close(loss, (math.log1p(math.exp(-1)) + math.log(2)) / 2)
    close(loss, 0.50320443)


def test_dpo_sigmoid_at_known_log_ratios():
    # policy log-ratios: chosen -10 - (-11) = +1, rejected -12 - (-11) = -1; beta 0.1 -> -log sigmoid(0.2)
    loss, rc, rr = align.preference_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                                         torch.tensor([-11.0]), beta=0.1)
    close(loss, 0.59813887)  # log(1 + e^-0.2)
    close(rc, [0.1])
    close(rr, [-0.1])
    # equal policy and reference: the loss is log 2 whatever beta is, and the rewards are 0
    loss, rc, rr = align.preference_loss(*(torch.tensor([-3.0]),) * 4, beta=7.0)
    close(loss, math.log(2))
    close(rc - rr, [0.0])


def test_ipo_averages_per_token():
    # chosen log-ratio +1 over 2 tokens, rejected -1 over 4: delta = 0.5 + 0.25 = 0.75; beta 0.5 -> (0.75 - 1)^2
    loss, _, _ = align.preference_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                                       torch.tensor([-11.0]), beta=0.5, loss_type="ipo",
                                       chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([4]))
    close(loss, 0.0625)


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_beta_must_be_positive(beta):
    with pytest.raises(ConfigError, match="beta=.*expected a number > 0"):
        align.preference_loss(*(torch.zeros(1),) * 4, beta=beta)
    with pytest.raises(ConfigError, match="beta="):
        AdaptiveKLController(beta)


def _trl_dpo_loss(loss_type, beta, policy_tokens, ref_logps, completion_mask):
    """trl 1.16's DPOTrainer._compute_loss on given per-token log-probs (a stand-in model returns them)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n = completion_mask.shape[0]
    seq = completion_mask.shape[1] - 1
    outputs = types.SimpleNamespace(log_probs=policy_tokens, entropy=torch.zeros(n, seq),
                                    mean_logits=torch.zeros(n, seq), is_top1=torch.zeros(n, seq, dtype=torch.bool))
    model = types.SimpleNamespace(training=True)
    identity = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = types.SimpleNamespace(
        model=model, accelerator=identity, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False,
        label_smoothing=0.0, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(n, seq + 1, dtype=torch.long), "attention_mask": torch.ones(n, seq + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_logps[0], "ref_rejected_logps": ref_logps[1]}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 1.0)])
def test_matches_trl(loss_type, beta):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    batch, seq = 3, 6
    # completion tokens: the last 3, 5 and 2 positions of the chosen rows; 4, 1, 5 of the rejected
    lengths = torch.tensor([3, 5, 2, 4, 1, 5])
    completion_mask = (torch.arange(seq + 1) >= seq + 1 - lengths[:, None]).long()
    per_token = -torch.rand(2 * batch, seq, generator=g, dtype=torch.float64) * 3 * completion_mask[:, 1:]
    ref = -torch.rand(2, batch, generator=g, dtype=torch.float64) * 8
    expected, metrics = _trl_dpo_loss(loss_type, beta, per_token, ref, completion_mask)
    logps = per_token.sum(1)
    tokens = completion_mask.sum(1)
    loss, rc, rr = align.preference_loss(logps[:batch], logps[batch:], ref[0], ref[1], beta, loss_type,
                                         chosen_tokens=tokens[:batch], rejected_tokens=tokens[batch:])
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    close(rc.mean(), metrics["rewards/chosen"][0])
    close((rc - rr).mean(), metrics["rewards/margins"][0])
    close((rc > rr).double().mean(), metrics["rewards/accuracies"][0])


def test_ppo_clipped_objective_by_hand():
    # ratios 1.5, 0.5, 1.1 (and one padded step); advantages 1, -1, -2; eps 0.2
    #   r=1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped);  r=0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped)
    #   r=1.1, A=-2: max(2.2, 2.2) = 2.2 (inside the range);  mean = 1.8 / 3 = 0.6, clip fraction 2/3
    old = torch.log(torch.tensor([[0.2, 0.4, 0.5, 0.3]]))
    new = old + torch.log(torch.tensor([[1.5, 0.5, 1.1, 9.0]]))
    adv = torch.tensor([[1.0, -1.0, -2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clip_fraction, approx_kl = align.ppo_policy_loss(new, old, adv, mask, clip_range=0.2)
    close(loss, 0.6)
    close(clip_fraction, 2 / 3)
    close(approx_kl, sum(0.5 * math.log(r) ** 2 for r in (1.5, 0.5, 1.1)) / 3)
    # the gradient flows only through the unclipped step: d/dlogp (-A r) = -A r = 2.2 at step 3, over 3 steps
    new.requires_grad_(True)
    align.ppo_policy_loss(new, old, adv, mask, 0.2)[0].backward()
    close(new.grad, [[0.0, 0.0, 2.2 / 3, 0.0]])


def test_ppo_value_loss_by_hand():
    # step 1: (1 - 2)^2 = 1 vs clipped 0.5 + 0.2 = 0.7: (0.7 - 2)^2 = 1.69 -> 1.69 (clipped)
    # step 2: (0 - 0)^2 = 0 vs 0.1 - 0.1 = 0: 0 -> 0.   0.5 * mean(1.69, 0) = 0.4225
    loss, clip_fraction = align.ppo_value_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.1]]),
                                               torch.tensor([[2.0, 0.0]]), torch.ones(1, 2), clip_range=0.2)
    close(loss, 0.4225)
    close(clip_fraction, 0.5)


def test_gae_four_steps_by_hand():
    # gamma 0.9, lambda 0.8 (gamma * lambda = 0.72); rewards (0, 0, 0, 1), values (0.5, 0.6, 0.7, 0.8)
    #   d3 = 1 - 0.8 = 0.2                A3 = 0.2
    #   d2 = 0.9 * 0.8 - 0.7 = 0.02       A2 = 0.02 + 0.72 * 0.2   = 0.164
    #   d1 = 0.9 * 0.7 - 0.6 = 0.03       A1 = 0.03 + 0.72 * 0.164 = 0.14808
    #   d0 = 0.9 * 0.6 - 0.5 = 0.04       A0 = 0.04 + 0.72 * 0.14808 = 0.1466176
    # second row: two real steps, rewards (0, 1), values (0.5, 0.5): A1 = 0.5, A0 = -0.05 + 0.72 * 0.5 = 0.31
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 5.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7, 0.8], [0.5, 0.5, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = align.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[0.1466176, 0.14808, 0.164, 0.2], [0.31, 0.5, 0.0, 0.0]])
    close(ret, [[0.6466176, 0.74808, 0.864, 1.0], [0.81, 1.0, 0.0, 0.0]])
    # gamma = lambda = 1: returns are the rewards-to-go, whatever the values
    _, ret = align.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(ret, [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])


def test_kl_estimators_by_hand_and_in_expectation():
    # p(token) = 0.5, ref(token) = 0.25: log r = log 0.5
    lp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    close(align.kl_estimate(lp, ref, "k1"), [math.log(2)])
    close(align.kl_estimate(lp, ref, "k2"), [0.5 * math.log(2) ** 2])
    close(align.kl_estimate(lp, ref, "k3"), [-0.5 + math.log(2)])
    # sampled from p, k1 and k3 average to KL(p || q) (unbiased); k3 is never negative
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())  # 0.3961...
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for estimator in ("k1", "k3"):
        est = align.kl_estimate(p.log()[tokens], q.log()[tokens], estimator)
        assert abs(float(est.mean()) - exact) < 0.01, estimator
    assert float(align.kl_estimate(p.log()[tokens], q.log()[tokens], "k3").min()) >= 0
    with pytest.raises(ConfigError, match="estimator"):
        align.kl_estimate(lp, ref, "k4")


def test_entropy_and_whiten():
    close(align.entropy(torch.zeros(2, 3, 4), torch.ones(2, 3)), math.log(4))
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    w = align.masked_whiten(x, torch.tensor([[1, 1, 1, 0]]))
    close(w, [[-1.0, 0.0, 1.0, 0.0]])  # mean 2, unbiased std 1; padding stays 0


def test_adaptive_kl_controller():
    fixed = AdaptiveKLController(0.1)
    assert fixed.update(kl=50.0, n_steps=64) == 0.1
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    close(adaptive.update(kl=12.0, n_steps=100), 0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    close(adaptive.update(kl=6.0 * 0.9, n_steps=100), 0.1 * 1.02 * (1 - 0.1 * 0.1))


def test_distillation_by_hand():
    # T = 2: student logits (2 ln 3, 0) / T -> (0.75, 0.25); teacher uniform (0.5, 0.5)
    #   KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.1438410;  CE(label 0) = -ln(9/10) = 0.1053605
    #   alpha 0.5: 0.5 * 4 * 0.1438410 + 0.5 * 0.1053605 = 0.3403623; the padded position is ignored
    student = torch.tensor([[[2 * math.log(3), 0.0], [5.0, -5.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [-5.0, 5.0]]])
    labels = torch.tensor([[0, IGNORE_INDEX]])
    loss, kl, ce = align.distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.5)
    close(kl, 0.5 * math.log(2 / 3) + 0.5 * math.log(2))
    close(ce, -math.log(0.9))
    close(loss, 0.34036230)
    # against torch's KL (batchmean over the one scored position)
    ref = F.kl_div(torch.log_softmax(student[:, :1] / 2, -1), torch.log_softmax(teacher[:, :1] / 2, -1),
                   log_target=True, reduction="sum")
    close(kl, ref)
    # alpha 0 is plain cross-entropy; mismatched vocabularies are refused
    close(align.distillation_loss(student, teacher, labels, 2.0, 0.0)[0], -math.log(0.9))
    with pytest.raises(ConfigError, match="same vocabulary"):
        align.distillation_loss(student, teacher[..., :1], labels)


def test_sequence_logps_sums_scored_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    total, count = align.sequence_logps(logits, torch.tensor([[IGNORE_INDEX, 1, 1]]))
    close(total, [math.log(0.1) + math.log(0.8)])
    assert count.tolist() == [2]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_kl_matches_trl(temperature):
    """trl 1.16's forward KL (generalised JSD with beta 0) of its distillation trainer, at temperature T."""
    pytest.importorskip("trl")
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    ws, wt = torch.randn(11, 8, generator=g), torch.randn(11, 8, generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    expected, _, _ = _chunked_divergence_loss(hs, ht, ws, wt, mask, beta=0.0, temperature=temperature)
    labels = torch.zeros(2, 5, dtype=torch.long).masked_fill(mask == 0, IGNORE_INDEX)
    _, kl, _ = align.distillation_loss(hs @ ws.T, ht @ wt.T, labels, temperature=temperature, alpha=1.0)
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-6)
