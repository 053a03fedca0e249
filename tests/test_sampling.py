"""Each logits processor against a hand computation, the documented order, and sampling
frequencies against the truncated distribution (chi-square)."""

import math

import pytest
import torch

from llmkit.errors import ConfigError
from llmkit.generate import sampling as S
from llmkit.generate.sampling import SamplingParams

INF = float("inf")


def row(*values):
    return torch.tensor([values], dtype=torch.float32)


def test_raw_logprobs_is_log_softmax():
    lp = S.raw_logprobs(row(1.0, 2.0, 3.0))
    z = math.log(math.e + math.e ** 2 + math.e ** 3)
    torch.testing.assert_close(lp, row(1 - z, 2 - z, 3 - z))


def test_logit_bias_adds_to_named_tokens():
    out = S.apply_logit_bias(row(1.0, 2.0, 3.0), {0: 5.0, 2: -100.0})
    torch.testing.assert_close(out, row(6.0, 2.0, -97.0))


def test_logit_bias_accepts_json_string_keys():
    torch.testing.assert_close(S.apply_logit_bias(row(1.0, 2.0), {"1": 2.0}), row(1.0, 4.0))


def test_min_tokens_bans_eos_until_enough_tokens():
    x = row(1.0, 2.0, 3.0)
    torch.testing.assert_close(S.apply_min_tokens(x, 1, 3, [2]), row(1.0, 2.0, -INF))
    torch.testing.assert_close(S.apply_min_tokens(x, 3, 3, [2]), x)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    seen = torch.tensor([[True, True, False]])
    out = S.apply_repetition_penalty(row(4.0, -4.0, 4.0), seen, 2.0)
    torch.testing.assert_close(out, row(2.0, -8.0, 4.0))


def test_frequency_and_presence_penalties_follow_openai():
    counts = torch.tensor([[0, 1, 3]])
    out = S.apply_frequency_presence(row(1.0, 1.0, 1.0), counts, frequency=0.5, presence=0.25)
    torch.testing.assert_close(out, row(1.0, 1.0 - 0.5 - 0.25, 1.0 - 1.5 - 0.25))


def test_temperature_divides():
    torch.testing.assert_close(S.apply_temperature(row(1.0, -2.0), 0.5), row(2.0, -4.0))


def test_min_p_drops_tokens_below_fraction_of_best():
    logits = torch.log(row(0.5, 0.3, 0.15, 0.05))
    out = S.apply_min_p(logits, 0.3)  # threshold 0.15: keeps 0.5, 0.3, 0.15
    assert torch.isinf(out[0, 3]) and torch.isfinite(out[0, :3]).all()


def test_top_k_keeps_k_best():
    out = S.apply_top_k(row(1.0, 4.0, 3.0, 2.0), 2)
    torch.testing.assert_close(out, row(-INF, 4.0, 3.0, -INF))


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(row(0.1, 0.5, 0.25, 0.15))
    out = S.apply_top_p(logits, 0.7)  # 0.5 + 0.25 = 0.75 >= 0.7
    assert torch.isfinite(out[0, [1, 2]]).all() and torch.isinf(out[0, [0, 3]]).all()
    out = S.apply_top_p(logits, 0.4)  # the best token alone is enough
    assert torch.isfinite(out[0, 1]) and torch.isinf(out[0, [0, 2, 3]]).all()


def test_processors_run_in_documented_order():
    # logit_bias, then repetition (which must see the biased, now positive, logit), then frequency
    params = SamplingParams(logit_bias={0: 3.0}, repetition_penalty=2.0, frequency_penalty=1.0, temperature=0.5)
    seen = torch.tensor([[True, False]])
    counts = torch.tensor([[1, 0]])
    out = S.process_logits(row(-1.0, 0.0), params, prompt_and_generated=seen, generated_counts=counts)
    torch.testing.assert_close(out, row(((-1.0 + 3.0) / 2.0 - 1.0) / 0.5, 0.0))


def test_temperature_zero_is_greedy_and_near_zero_matches():
    logits = torch.randn(16, 50)
    greedy = S.sample(S.process_logits(logits, SamplingParams(temperature=0)), SamplingParams(temperature=0))
    assert torch.equal(greedy, logits.argmax(-1))
    cold = SamplingParams(temperature=1e-4, seed=0)
    drawn = S.sample(S.process_logits(logits, cold), cold, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, greedy)


def _chi_square_p(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test (scipy-free: regularised upper gamma via series)."""
    keep = expected_probs > 0
    assert observed[~keep].sum() == 0, "a truncated token was sampled"
    n = observed.sum()
    exp = expected_probs[keep] * n
    stat = float(((observed[keep] - exp) ** 2 / exp).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("name,params,kept", [
    ("top_k", SamplingParams(top_k=3), [0, 1, 2]),
    ("top_p", SamplingParams(top_p=0.8), [0, 1, 2]),  # 0.4 + 0.25 + 0.15 = 0.8
    ("min_p", SamplingParams(min_p=0.3), [0, 1, 2]),  # threshold 0.12
    ("temperature", SamplingParams(temperature=2.0), [0, 1, 2, 3, 4, 5]),
])
def test_sampling_frequencies_match_truncated_distribution(name, params, kept):
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log()[None].repeat(20000, 1)
    processed = S.process_logits(logits, params)
    draws = S.sample(processed, params, torch.Generator().manual_seed(1))
    observed = torch.bincount(draws, minlength=6).double()
    target = probs.double() ** (1 / params.temperature)
    mask = torch.zeros(6, dtype=torch.bool)
    mask[kept] = True
    target = torch.where(mask, target, 0.0)
    target /= target.sum()
    assert _chi_square_p(observed, target) > 1e-3
    if len(kept) < 6:  # and the test can tell: the untruncated distribution is rejected
        assert _chi_square_p(observed, probs.double()) < 1e-6


def test_chi_square_rejects_a_wrong_distribution():
    draws = torch.multinomial(torch.tensor([0.5, 0.5]), 20000, replacement=True,
                              generator=torch.Generator().manual_seed(0))
    observed = torch.bincount(draws, minlength=2).double()
    assert _chi_square_p(observed, torch.tensor([0.6, 0.4], dtype=torch.float64)) < 1e-6


def test_per_row_generators_are_independent_of_batch():
    params = SamplingParams(temperature=1.0)
    logits = torch.randn(3, 40)
    gens = S.make_generators(7, 3)
    together = S.sample(logits, params, gens)
    alone = torch.stack([S.sample(logits[i:i + 1], params, [S.make_generators(7, 3)[i]])[0] for i in range(3)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(min_p=2.0), "min_p"),
    (dict(n=0), "n"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop=[""]), "stop"),
    (dict(logit_bias={"x": 1.0}), "logit_bias"),
    (dict(logit_bias={3: 500.0}), "logit_bias"),
])
def test_bad_parameters_raise_one_clear_error(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**kwargs)
