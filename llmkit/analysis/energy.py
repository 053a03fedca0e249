"""Energy and CO2 of a piece of work: measured joules from RAPL when the kernel lets us read them,
else an estimate from this process's CPU time times a stated power per core.

RAPL (`/sys/class/powercap/intel-rapl:N/energy_uj`, also on AMD since Linux 5.8) counts the whole
package: other processes' work is in it, and most distributions make it readable by root only.
The estimate charges `LLMKIT_WATTS_PER_CORE` (default 10 W: a 2-core share of a ~200 W, 32-core
server part at full load, or a laptop core) for every CPU-second this process used, in all its
threads. CO2 is joules / 3.6e6 kWh times a grid intensity, `LLMKIT_GRID_GCO2_PER_KWH` (default
475 g/kWh: the world's average electricity, IEA 2019), so a report states which numbers it used.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from llmkit.errors import ConfigError

POWERCAP = Path("/sys/class/powercap")
DEFAULT_WATTS_PER_CORE = 10.0
DEFAULT_GRID_GCO2_PER_KWH = 475.0


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"{name}={raw!r}; expected a number >= 0")
    return value


def rapl_domains(root: Path = POWERCAP) -> list[Path]:
    """The readable package-level RAPL zones (intel-rapl:N, not their sub-zones such as core or dram)."""
    zones = []
    for zone in sorted(root.glob("intel-rapl:*")):
        if zone.name.count(":") == 1 and os.access(zone / "energy_uj", os.R_OK):
            try:
                int((zone / "energy_uj").read_text())
            except (OSError, ValueError):
                continue
            zones.append(zone)
    return zones


def _read_uj(zone: Path) -> int:
    return int((zone / "energy_uj").read_text())


def _range_uj(zone: Path) -> int | None:
    try:
        return int((zone / "max_energy_range_uj").read_text())
    except (OSError, ValueError):
        return None


class EnergyMeter:
    """`with EnergyMeter() as m: work()`, then `m.result()`; or `m = EnergyMeter().start()` ... `m.result()`."""

    def __init__(self, root: Path = POWERCAP):
        self.zones = rapl_domains(root)
        self.watts_per_core = _env_float("LLMKIT_WATTS_PER_CORE", DEFAULT_WATTS_PER_CORE)
        self.grid = _env_float("LLMKIT_GRID_GCO2_PER_KWH", DEFAULT_GRID_GCO2_PER_KWH)
        self._start: tuple[float, float, list[int]] | None = None

    def start(self) -> EnergyMeter:
        self._start = (time.perf_counter(), time.process_time(), [_read_uj(z) for z in self.zones])
        return self

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, *exc) -> None:
        return None

    def result(self) -> dict[str, Any]:
        """Joules and grams of CO2 since `start`, with how they were obtained."""
        if self._start is None:
            raise RuntimeError("EnergyMeter.result() before start()")
        wall0, cpu0, uj0 = self._start
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if self.zones:
            joules = 0.0
            for zone, before in zip(self.zones, uj0, strict=True):
                delta = _read_uj(zone) - before
                if delta < 0:  # the counter wrapped around
                    delta += _range_uj(zone) or 0
                joules += delta / 1e6
            method = f"measured: RAPL {', '.join(z.name for z in self.zones)} (whole package, all processes)"
        else:
            joules = cpu * self.watts_per_core
            method = f"estimated: {cpu:.1f} CPU-seconds x {self.watts_per_core:g} W per core (RAPL not readable)"
        return {"joules": round(joules, 3), "kwh": joules / 3.6e6, "wall_seconds": round(wall, 3),
                "cpu_seconds": round(cpu, 3), "method": method, "grid_gco2_per_kwh": self.grid,
                "co2_grams": round(joules / 3.6e6 * self.grid, 6)}


def render_energy(e: dict[str, Any]) -> str:
    """One Markdown line for a report."""
    return (f"- energy: {e['joules']:.1f} J ({e['kwh'] * 1000:.4f} Wh), {e['co2_grams']:.3f} g CO2 at "
            f"{e['grid_gco2_per_kwh']:g} g/kWh; {e['method']}; {e['wall_seconds']:.1f} s wall clock")
