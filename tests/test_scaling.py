"""Scaling laws: the fits recover the exponents that generated synthetic data, the compute-optimal
split agrees with a brute-force search along C = 6ND, and a tiny real sweep writes rows, resumes
without redoing finished runs, and is read by `scaling fit`."""


import json

import numpy as np
import pytest

from llmkit.analysis.scaling import Chinchilla, fit_chinchilla, fit_power_law, fit_rows, frontier
from llmkit.errors import DataError

# Multiplicative noise of 0.2 % (a validation loss measured on a few hundred thousand tokens is about
# that noisy); a fit that is right recovers the exponents to well within 1 % through it.
NOISE = 0.002


def noisy(values, seed=0):
    return values * np.exp(np.random.default_rng(seed).normal(0, NOISE, len(values)))


def test_power_law_recovers_kaplans_exponent():
    N = np.geomspace(1e5, 1e8, 10)
    fit = fit_power_law(N, noisy((8.8e13 / N) ** 0.076))  # Kaplan's L(N)
    assert fit.alpha == pytest.approx(0.076, rel=0.01)
    assert fit.E == 0.0


def test_power_law_with_an_irreducible_loss():
    D = np.geomspace(1e6, 1e9, 12)
    fit = fit_power_law(D, noisy(1.5 + 300 * D ** -0.4, seed=1), irreducible=True)
    assert fit.alpha == pytest.approx(0.4, rel=0.01)
    assert fit.E == pytest.approx(1.5, rel=0.01)


def test_chinchilla_fit_recovers_hoffmanns_law():
    true = Chinchilla(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    N, D = (g.ravel() for g in np.meshgrid(np.geomspace(1e5, 3e6, 6), np.geomspace(1e6, 1e8, 4)))
    fit = fit_chinchilla(N, D, noisy(true(N, D), seed=2))
    assert fit.alpha == pytest.approx(0.34, rel=0.01)
    assert fit.beta == pytest.approx(0.28, rel=0.01)
    assert fit.E == pytest.approx(1.69, rel=0.05)  # E trades off against A and B: looser, as in the paper


def test_each_law_takes_its_papers_parameter_count():
    """Rows with N (non-embedding) and N_total: Chinchilla's L(N, D) is fitted on N_total and Kaplan's L(N)
    on N, so data generated with each law in its own count gives back both exponents."""
    true = Chinchilla(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    N_total, D = (g.ravel() for g in np.meshgrid(np.geomspace(1e5, 3e6, 6), np.geomspace(1e6, 1e8, 4)))
    embedding = 6e4  # 60 % of the smallest model, as in the sweep
    rows = [{"N": n - embedding, "N_total": n, "D": d, "C": 6 * (n - embedding) * d}
            for n, d in zip(N_total, D, strict=True)]
    loss = noisy(true(N_total, D), seed=2)  # the data of test_chinchilla_fit_recovers_hoffmanns_law
    for row, value in zip(rows, loss, strict=True):
        row["val_loss"] = float(value)
    result = fit_rows(rows, bootstrap=0)
    assert result["fits"]["L(N,D)"]["alpha"] == pytest.approx(0.34, rel=0.01)
    assert result["fits"]["L(N,D)"]["beta"] == pytest.approx(0.28, rel=0.01)
    assert result["compute_optimal"]["C"] == max(6 * r["N_total"] * r["D"] for r in rows)
    sizes = np.geomspace(1e5, 1e8, 10)
    kaplan = [{"N": n, "D": 1e9, "C": 6e9 * n, "val_loss": float(v), "N_total": n * 10}
              for n, v in zip(sizes, noisy((8.8e13 / sizes) ** 0.076), strict=True)]
    assert fit_rows(kaplan, bootstrap=0)["fits"]["L(N)"]["alpha"] == pytest.approx(0.076, rel=0.01)


def test_compute_optimal_equals_a_brute_force_search():
    law = Chinchilla(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    C = 5.76e23  # Chinchilla's own budget
    best = law.compute_optimal(C)
    N = np.geomspace(1e9, 1e12, 200_001)
    brute = N[np.argmin(law(N, C / (6 * N)))]
    assert best["N"] == pytest.approx(brute, rel=1e-4)  # the grid's step is 3.5e-5 in log10
    assert best["N"] * best["D"] * 6 == pytest.approx(C)
    assert best["tokens_per_parameter"] == pytest.approx(best["D"] / best["N"])


def test_frontier_keeps_the_lower_envelope():
    C = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    loss = np.array([5.0, 5.5, 4.0, 4.5, 3.0])
    assert frontier(C, loss).tolist() == [0, 2, 4]


def test_bad_input_is_named():
    with pytest.raises(DataError, match="at least 3 points"):
        fit_power_law([1, 2], [3, 2])
    with pytest.raises(DataError, match="finite and positive"):
        fit_power_law([1, 2, -3], [3, 2, 1])
    with pytest.raises(DataError, match="at least 5 runs"):
        fit_chinchilla([1, 2, 3], [1, 2, 3], [3, 2, 1])


# ---- a real sweep, tiny ------------------------------------------------------------------------


def test_tiny_sweep_writes_rows_resumes_and_fits(shakespeare_shards, tmp_path, capsys):
    from llmkit.cli import main
    from llmkit.train.sweep import SweepConfig, sweep

    config = SweepConfig(out_dir=str(tmp_path), sizes=["1x32", "2x64"], tokens=[2048, 4096], data=str(shakespeare_shards),
                         context=32, batch_size=4, lr=1e-2, warmup_steps=2, eval_batches=2, save_every=0, threads=1)
    path = sweep(config)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["size"], r["D"]) for r in rows] == [("1x32", 2048), ("1x32", 4096), ("2x64", 2048), ("2x64", 4096)]
    for r in rows:
        assert r["C"] == 6 * r["N"] * r["D"] and r["steps"] == r["D"] // 128  # 4 x 32 tokens per step
        assert 0 < r["val_loss"] < 5 and r["wall_s"] > 0 and r["energy_j"] > 0
    # non-embedding parameters by hand: per layer 4 d^2 (attention) + 3 d d_ff (SwiGLU) + 2 d (norms), + final norm
    assert rows[0]["N"] == 1 * (4 * 32 * 32 + 3 * 32 * 96 + 2 * 32) + 32
    assert rows[1]["val_loss"] < rows[0]["val_loss"]  # twice the tokens helps even this small a model
    report = json.loads((tmp_path / "runs" / "1x32-2048" / "train" / "report.json").read_text())
    assert report["energy"]["joules"] > 0 and report["energy"]["grid_gco2_per_kwh"] == 475.0  # every training report

    # a killed sweep: a torn last line; the finished runs are not redone, a new budget is added
    finished = {r["size"]: (tmp_path / r["run"] / "train" / "metrics.jsonl").stat().st_mtime_ns for r in rows}
    with open(path, "a") as f:
        f.write('{"size": "2x64", "bud')
    sweep(SweepConfig(**{**config.__dict__, "tokens": [2048, 4096, 8192]}))
    again = [json.loads(line) for line in path.read_text().splitlines()]
    assert again[:4] == rows  # untouched
    assert [(r["size"], r["D"]) for r in again[4:]] == [("1x32", 8192), ("2x64", 8192)]
    assert {r["size"]: (tmp_path / r["run"] / "train" / "metrics.jsonl").stat().st_mtime_ns
            for r in rows} == finished

    assert main(["scaling", "fit", str(tmp_path), "--bootstrap", "20"]) == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["runs"] == 6 and fit["fits"]["L(N,D)"]["alpha"] > 0
    assert fit["command"] == f"llmkit scaling fit {tmp_path} --bootstrap 20 --seed 0" and fit["recorded"]["date"]
    # the budget: the sweep's largest C counted with all parameters, as Chinchilla's N is
    assert fit["compute_optimal"]["N"] * fit["compute_optimal"]["D"] * 6 == \
        pytest.approx(max(6 * r["N_total"] * r["D"] for r in again))
    assert (tmp_path / "scaling.png").stat().st_size > 20_000
    assert "L(N,D) = E + A/N^α + B/D^β" in capsys.readouterr().out


def test_sweep_refuses_data_it_cannot_compare(tmp_path, shakespeare_shards):
    from llmkit.errors import ConfigError
    from llmkit.train.sweep import SweepConfig, sweep

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "sweep_data.json").write_text(json.dumps(
        {"sources": "kjv:1", "vocab_size": 4096, "val_fraction": 0.01, "seed": 1337}))
    with pytest.raises(ConfigError, match=r"other data settings .*'sources': \('kjv:1', 'wikipedia:0.5,bbcnews:0.5'\)"):
        sweep(SweepConfig(out_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="size '3x100': expected LAYERSxWIDTH"):
        sweep(SweepConfig(out_dir=str(tmp_path / "b"), data=str(shakespeare_shards), sizes=["3x100"]))
    with pytest.raises(DataError, match="no validation shards"):
        sweep(SweepConfig(out_dir=str(tmp_path / "c"), data=str(shakespeare_shards / "train")))
    assert not (tmp_path / "b" / "sweep.jsonl").exists() and not (tmp_path / "c" / "runs").exists()
