"""Resident memory of this process, for the reports of recipes and benchmarks (what a run needed)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """Resident memory now (Linux; None elsewhere)."""
    return _proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident memory of this process: since the last `reset_peak_rss()` where Linux allows
    resetting it (VmHWM), else since the start (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    if (hwm := _proc_status_mb("VmHWM")) is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
