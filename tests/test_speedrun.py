"""The main job end to end, on a one-minute budget: every stage runs and the report is complete."""

import json

import pytest

from llmkit.speedrun import SpeedrunConfig, speedrun


@pytest.mark.slow
def test_speedrun_writes_a_complete_report_and_announces_every_stage(tmp_path, capsys):
    config = SpeedrunConfig(name="mini", runs_dir=str(tmp_path), budget_minutes=1.5, sources="tinyshakespeare:1",
                            vocab_size=512, model="llama-tiny", context=64, batch_size=8, lr=5e-3,
                            warmup_steps=10, eval_every=50, eval_batches=4, compile=False, sample_tokens=12,
                            reserve_minutes=0.3)
    run = speedrun(config)
    out = capsys.readouterr()
    for stage in ("fetch + prepare", "tokenizer", "tokenize", "calibrate", "pretrain", "sample"):
        assert f"[speedrun] {stage} ...\n" in out.out and f"[speedrun] {stage}: " in out.out, stage
    for bar in ("read", "tokenize", "time a step", "train", "validation"):  # the stages' own bars
        assert f"{bar}" in out.err, bar
    report = json.loads((run / "report.json").read_text())
    assert report["training"]["steps"] >= 10
    assert 0 < report["final"]["val_bpb"] < 8  # below the 8 bits of a byte-uniform model
    assert report["final"]["val_loss"] < 6.2  # below ln(512): it learned something
    assert report["timings_s"]["total"] < 1.5 * 60 + 30
    md = (run / "report.md").read_text()
    assert "None" not in md
    assert "validation bits per byte" in md and "## Samples" in md and "tinyshakespeare" in md
    assert (run / "loss.png").stat().st_size > 10_000
    assert len(report["samples"]) == 3
    assert report["data"]["sources"]["tinyshakespeare"]["license"]
