"""Energy in reports: RAPL counters read as the kernel exposes them (a fake powercap tree), the CPU-time
estimate when they are not readable, and CO2 from the stated grid intensity, all checked by hand."""

import time

import pytest

from llmkit.analysis.energy import EnergyMeter, rapl_domains, render_energy
from llmkit.errors import ConfigError


def zone(root, name, uj, max_range=None):
    (root / name).mkdir()
    (root / name / "energy_uj").write_text(f"{uj}\n")
    if max_range is not None:
        (root / name / "max_energy_range_uj").write_text(f"{max_range}\n")
    return root / name


def test_rapl_packages_are_summed_and_subzones_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_GRID_GCO2_PER_KWH", "400")
    p0, p1 = zone(tmp_path, "intel-rapl:0", 1_000_000), zone(tmp_path, "intel-rapl:1", 5_000_000)
    zone(tmp_path, "intel-rapl:0:0", 7)  # the cores inside package 0: already in its count
    assert [z.name for z in rapl_domains(tmp_path)] == ["intel-rapl:0", "intel-rapl:1"]
    meter = EnergyMeter(tmp_path).start()
    (p0 / "energy_uj").write_text("4600000\n")  # +3.6 J
    (p1 / "energy_uj").write_text("8600000\n")  # +3.6 J
    e = meter.result()
    assert e["joules"] == pytest.approx(7.2)
    assert e["co2_grams"] == pytest.approx(7.2 / 3.6e6 * 400)  # 0.0008 g
    assert e["method"].startswith("measured: RAPL intel-rapl:0, intel-rapl:1")
    assert "7.2 J" in render_energy(e) and "400 g/kWh" in render_energy(e)


def test_a_wrapped_counter_adds_its_range(tmp_path):
    p0 = zone(tmp_path, "intel-rapl:0", 262_143_000_000, max_range=262_143_328_850)
    meter = EnergyMeter(tmp_path).start()
    (p0 / "energy_uj").write_text("1000000\n")
    assert meter.result()["joules"] == pytest.approx((262_143_328_850 - 262_143_000_000 + 1_000_000) / 1e6, abs=1e-3)  # reported to the mJ


def test_without_rapl_cpu_time_times_watts_per_core(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_WATTS_PER_CORE", "12.5")
    meter = EnergyMeter(tmp_path).start()  # an empty powercap folder: nothing readable
    cpu0 = time.process_time()
    while time.process_time() - cpu0 < 0.1:  # burn 0.1 s of CPU (however long a busy machine takes)
        sum(range(1000))
    e = meter.result()
    cpu = time.process_time() - cpu0
    assert e["method"].startswith("estimated")
    assert 0.1 <= e["cpu_seconds"] <= cpu + 1e-3
    assert e["joules"] == pytest.approx(e["cpu_seconds"] * 12.5, abs=1e-3)  # rounded to the millijoule
    assert e["co2_grams"] == pytest.approx(e["joules"] / 3.6e6 * 475, rel=1e-3)  # the default grid intensity


def test_a_bad_setting_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_GRID_GCO2_PER_KWH", "lots")
    with pytest.raises(ConfigError, match="LLMKIT_GRID_GCO2_PER_KWH='lots'; expected a number >= 0"):
        EnergyMeter(tmp_path)


def test_an_eval_report_states_its_energy(tmp_path):
    import json
    from pathlib import Path

    from gguf_helpers import tiny_model

    from llmkit.eval import evaluate, write_report

    model, tok = tiny_model()
    mc = Path(__file__).resolve().parent / "data" / "eval" / "mc.yaml"
    result = evaluate(model, tok, [str(mc)], limit=2, progress=False)
    assert result["energy"]["joules"] >= 0 and result["energy"]["method"].startswith(("measured", "estimated"))
    write_report(result, tmp_path, "tiny")
    assert json.loads((tmp_path / "results.json").read_text())["energy"] == result["energy"]
    assert "- energy: " in (tmp_path / "report.md").read_text()
