"""The one report writer of the training recipes: `report.json` (every number, for scripts) and
`report.md` (for a person), laid out the same way for every recipe so that runs read side by side."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmkit.analysis.energy import render_energy
from llmkit.files import atomic_write_json, atomic_write_text
from llmkit.train.loop import TrainResult


def run_summary(result: TrainResult) -> dict[str, Any]:
    """The loop's outcome as report keys: steps, why it stopped, the last checkpoint, the evaluations."""
    evals = [r for r in result.history if "val_loss" in r]
    return {"steps": result.step, "stopped": result.stopped, "checkpoint": str(result.last_checkpoint),
            "first_eval": evals[0] if evals else None, "last_eval": evals[-1] if evals else None,
            "evals": evals, "energy": result.energy}


def write_report(out_dir: str | Path, title: str, report: dict[str, Any], sections: Iterable[str] = (),
                 plots: dict[str, str] | None = None) -> None:
    """Write `report` to report.json, and report.md: the title, the run (steps, stop reason,
    checkpoint, energy and CO2), the held-out evaluations as a table, the `plots` (caption -> PNG in out_dir), then
    the recipe's own Markdown `sections`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "report.json", report)
    lines = [f"# {title}", ""]
    if "steps" in report:
        lines.append(f"- steps: {report['steps']} ({report.get('stopped', 'max_steps')}); "
                     f"checkpoint: `{report.get('checkpoint')}`")
    if report.get("energy"):
        lines.append(render_energy(report["energy"]))
    lines += _eval_table(report.get("evals") or [])
    for caption, file in (plots or {}).items():
        lines += ["", f"![{caption}]({file})"]
    for section in sections:
        lines += ["", section.rstrip("\n")]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")


def _eval_table(evals: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(k for r in evals for k in r if k != "step"))
    if not columns:
        return []
    lines = ["", "| step | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for r in evals:
        lines.append(f"| {r.get('step', '')} | " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
    return lines


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)
