"""Stage 5: a markdown table from whatever summary.json holds (also on its own: `gpu_suite.py --table DIR`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.suite.recorder import Target


def _value(summary: dict[str, Any], figure: str) -> Any:
    stage, key = figure.split(".", 1)
    return summary["stages"].get(stage, {}).get("figures", {}).get(key)


def _shown(value: Any) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(summary: dict[str, Any]) -> str:
    header = (
        f"Device: {summary.get('device')}; scale: {summary.get('scale')}; started {summary.get('started')}; "
        f"command: `{summary.get('command')}`"
    )
    estimates = summary.get("estimates", {})
    lines = [header, "", "| figure | measured | estimate | target | verdict |", "|---|---|---|---|---|"]
    for raw in summary.get("targets", []):
        target = Target(**raw)
        value = _value(summary, target.figure)
        number = value if isinstance(value, (int, float)) else None
        estimate = _shown(estimates[target.figure]["value"]) if target.figure in estimates else ""
        lines.append(
            f"| {target.label} (`{target.figure}`) | {_shown(value)} | {estimate} | {target.describe()} "
            f"| {target.verdict(number)} |"
        )
    if estimates:
        lines += ["", "| figure | measured | estimate | basis of the estimate |", "|---|---|---|---|"]
        for figure, estimate in estimates.items():
            lines.append(
                f"| `{figure}` | {_shown(_value(summary, figure))} | {_shown(estimate['value'])} "
                f"| {estimate['basis']} |"
            )
    outcomes = {
        key.removesuffix(".outcome"): value
        for key, value in summary.get("stages", {}).get("stream", {}).get("figures", {}).items()
        if key.endswith(".outcome")
    }
    if outcomes:
        lines += ["", "| streaming variant | status | seconds | note |", "|---|---|---|---|"]
        for variant, outcome in outcomes.items():
            seconds = outcome.get("seconds")
            lines.append(
                f"| {variant} | {outcome['status']} | {'' if seconds is None else f'{seconds:.1f}'} "
                f"| {outcome.get('error') or outcome.get('reason') or ''} |"
            )
    lines += ["", "| stage | status | seconds | figures | note |", "|---|---|---|---|---|"]
    for name, stage in summary.get("stages", {}).items():
        note = stage.get("error") or stage.get("reason") or ""
        lines.append(
            f"| {name} | {stage['status']} | {stage.get('seconds', '')} | {len(stage.get('figures', {}))} "
            f"| {note.splitlines()[0] if note else ''} |"
        )
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path) -> str:
    """Render `out_dir/summary.json` into `out_dir/table.md`; returns the markdown."""
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    text = markdown(summary)
    (Path(out_dir) / "table.md").write_text(text)
    return text
