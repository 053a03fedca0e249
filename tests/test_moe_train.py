"""Pretraining the MoE preset through the one loop: the router losses in the logged objective, each
layer's expert loads in metrics.jsonl, the utilisation PNG and the load band in the report, and a
smoke run of benchmarks/moe_vs_dense.py (the full comparison needs ~20 quiet minutes; not run here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import test_pretrain

from llmkit.analysis.plots import expert_load_band, expert_loads
from llmkit.train import pretrain
from llmkit.train.pretrain import PretrainConfig

ROOT = Path(__file__).parent.parent
shards = test_pretrain.shards  # the character-level tinyshakespeare shards, as train/ and val/


def test_moe_pretraining_logs_expert_loads_and_plots_them(shards, tmp_path):
    config = PretrainConfig(model="mixtral-2m", data=str(shards), out_dir=str(tmp_path), context=32, batch_size=4,
                            max_steps=8, warmup_steps=2, lr=3e-3, eval_every=4, eval_batches=1, save_every=0,
                            progress=False, seed=3)
    result = pretrain.run(config)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert len(train) == 8
    for r in train:  # the optimised loss is the LM loss plus the router terms at the preset's coefficients
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.01 * r["aux_loss"] + 0.001 * r["z_loss"], abs=1e-5)
        assert 0 < r["aux_loss"] < 8 and r["z_loss"] > 0
        for layer in range(4):
            assert sum(r[f"expert_load.{layer}.{e}"] for e in range(8)) == pytest.approx(1, abs=1e-5)
    assert all("val_loss" in r and "aux_loss" not in r for r in records if "val_loss" in r)  # LM loss only
    steps, layers = expert_loads(records)
    assert steps == list(range(1, 9)) and sorted(layers) == [0, 1, 2, 3]
    png = tmp_path / "expert_load.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    band = result.report["expert_load"]
    assert band == expert_load_band(records) and 0 <= band["min_load"] <= 1 <= band["max_load"] <= 4
    report = (tmp_path / "report.md").read_text()
    assert "(expert_load.png)" in report and "x its even share" in report


def test_expert_load_band_by_hand():
    records = [{"step": s, "expert_load.0.0": a, "expert_load.0.1": 1 - a} for s, a in ((1, 0.9), (2, 0.6), (3, 0.7))]
    band = expert_load_band(records, last=2 / 3)  # the last 2 steps: shares 0.65 / 0.35 -> 1.3 / 0.7 of even
    # one step at a time: (0.6, 0.4) and (0.7, 0.3) -> idlest 0.8 and 0.6 (mean 0.7), busiest 1.2 and 1.4 (1.3)
    assert band == pytest.approx({"min_load": 0.7, "max_load": 1.3, "step_min_load": 0.7, "step_max_load": 1.3,
                                  "steps_averaged": 2})
    flipping = [{"step": s, "expert_load.0.0": float(s % 2), "expert_load.0.1": float(1 - s % 2)} for s in range(1, 11)]
    band = expert_load_band(flipping, last=1.0)  # all tokens to one expert, alternating: even on average only
    assert band == pytest.approx({"min_load": 1.0, "max_load": 1.0, "step_min_load": 0.0, "step_max_load": 2.0,
                                  "steps_averaged": 10})
    assert expert_load_band([{"step": 1, "loss": 2.0}]) == {}


def test_moe_vs_dense_script_smoke(shards, tmp_path, monkeypatch):
    """Two steps of each arm on the character shards; the full comparison is the lead's quiet-machine run."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("moe_vs_dense", ROOT / "benchmarks" / "moe_vs_dense.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    report = script.main(["--data", str(shards), "--max-steps", "2", "--context", "32", "--batch-size", "4",
                          "--warmup-steps", "1", "--eval-batches", "1", "--no-progress", "--work", str(tmp_path / "w"),
                          "--out", str(tmp_path / "r.json"), "--docs", str(tmp_path / "docs")])
    arms = report["arms"]
    assert list(arms) == ["dense", "moe", "moe-global", "moe-no-balance"]
    assert arms["moe-global"]["overrides"] == {"router_balance": "global"}
    assert arms["moe"]["active_parameters"] == arms["dense"]["active_parameters"] + 4 * 128 * 8  # + the routers
    assert arms["dense"]["expert_load"] is None and arms["moe"]["expert_load"]["min_load"] >= 0
    assert all(a["steps"] == 2 and a["val_bpb"] > 0 for a in arms.values())
    assert json.loads((tmp_path / "r.json").read_text())["commit"]
    doc = (tmp_path / "docs" / "moe_vs_dense.md").read_text()
    assert "| moe-no-balance | `mixtral-2m` |" in doc and "Lowest held-out bits per byte" in doc
    assert doc.count("x even |") == 3 and "| dense | `llama-2m` |" in doc
    for png in ("moe_vs_dense.png", "moe_vs_dense_moe_experts.png", "moe_vs_dense_moe-no-balance_experts.png"):
        assert (tmp_path / "docs" / png).read_bytes()[:4] == b"\x89PNG"


def test_moe_recipes_parse():
    from llmkit.options import build_config
    from llmkit.speedrun import SpeedrunConfig

    assert build_config(PretrainConfig, ROOT / "recipes" / "pretrain-moe.yaml").model == "mixtral-2m"
    assert build_config(SpeedrunConfig, ROOT / "recipes" / "speedrun-moe.yaml").model == "mixtral-2m"


def test_speedrun_report_states_the_expert_load_band():
    from llmkit.speedrun import _expert_lines

    summary = {"expert_load": {"min_load": 0.81, "max_load": 1.234, "step_min_load": 0.1, "step_max_load": 3.0,
                               "steps_averaged": 40},
               "model": {"config": {"n_experts": 8, "experts_per_token": 2}}}
    text = "\n".join(_expert_lines(summary))
    assert "8 experts, 2 per token" in text and "0.81-1.23 x its even share" in text
    assert "the idlest 0.10 x, the busiest 3.00 x" in text
    assert "![expert utilisation](train/expert_load.png)" in text
    assert _expert_lines({"expert_load": None, "model": {"config": {}}}) == []
