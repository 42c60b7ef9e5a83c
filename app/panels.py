"""The side panel, built from the chunks' typed reports: KV-cache memory over time (for `gr.LinePlot`), a map of
which layers went local, and a table of statistics memory and per-chunk timings.

Everything is self-contained HTML with inline styles (no external CSS or JS) and every text that comes
from a report is escaped, because Gradio renders `gr.HTML` as-is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

import pandas as pd

from app.metrics import ChunkDrift
from avatars.base import ChunkReport
from ispa import BlockReport

BYTES_PER_GB = 1e9
THIS_RUN = "this run"
FULL_RING = "Full (bounded ring)"
FULL_UNBOUNDED = "Full (unbounded)"
FULL_RUN = "Full run"
ISPA_RUN = "ISPA run"
EVENT_LABELS = {"absorbed": "absorbed", "recalibration_started": "recalibration"}

_L_STYLE = "background:#15803d;color:#fff;"
_F_STYLE = "background:#e5e7eb;color:#111827;"
_CELL_STYLE = "border-radius:4px;padding:2px 0;text-align:center;font:11px/1.2 monospace;"
_TABLE_STYLE = "border-collapse:collapse;font:12px/1.4 sans-serif;"
_TD_STYLE = "padding:2px 8px;border-bottom:1px solid #e5e7eb;text-align:right;"


class KVTimeline:
    """KV-cache bytes per chunk, gathered as chunks arrive, as a long-format table for `gr.LinePlot`.

    Single mode plots this run against the two full-cache baselines the engine reports; compare mode
    plots the measured Full and ISPA runs. Absorption and recalibration moments become vertical lines
    (two points each, at 0 and at the plot's top) in series of their own.
    """

    def __init__(self, compare: bool = False) -> None:
        self.compare = compare
        self._rows: list[tuple[float, float, str]] = []
        self._clock: dict[str, float] = {}
        self.events: list[tuple[float, str]] = []  # (t_seconds, label), in arrival order

    def add(self, report: BlockReport, seconds: float, run: str = THIS_RUN) -> None:
        """Add one chunk's engine report; `seconds` is the chunk's video duration (its frames / fps)."""
        allowed = (FULL_RUN, ISPA_RUN) if self.compare else (THIS_RUN,)
        if run not in allowed:
            raise ValueError(f"run must be one of {allowed} in this mode, got {run!r}")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds must be positive, got {seconds}")
        t = self._clock.get(run, 0.0) + seconds
        self._clock[run] = t
        self._rows.append((t, report.kv_bytes / BYTES_PER_GB, run))
        if not self.compare:
            self._rows.append((t, report.kv_bytes_full_ring / BYTES_PER_GB, FULL_RING))
            self._rows.append((t, report.kv_bytes_full_unbounded / BYTES_PER_GB, FULL_UNBOUNDED))
        event = report.event
        if event is not None:
            if event not in EVENT_LABELS:
                raise ValueError(f"unknown report event {event!r}")
            self.events.append((t, EVENT_LABELS[event]))

    def dataframe(self) -> pd.DataFrame:
        """Columns t_seconds, GB, series; one row per run/baseline per chunk, plus event markers."""
        top = max((gb for _, gb, _ in self._rows), default=0.0) or 1.0
        rows = list(self._rows)
        seen: dict[str, int] = {}
        for t, label in self.events:
            seen[label] = seen.get(label, 0) + 1
            name = label if seen[label] == 1 else f"{label} {seen[label]}"
            rows += [(t, 0.0, name), (t, top, name)]
        return pd.DataFrame(rows, columns=["t_seconds", "GB", "series"])

    def annotation(self) -> str:
        """The event moments in words, for a caption under the plot."""
        if not self.events:
            return "No layer has gone local yet (warmup)." if not self.compare else ""
        return " · ".join(f"{label} at {t:.2f} s" for t, label in self.events)


def layer_map_html(report: BlockReport) -> str:
    """A grid with one cell per layer: F (full attention) or L (local), its ε shown small and on hover."""
    n = len(report.kv_bytes_per_layer)
    local = set(report.l_layers)
    if any(not 0 <= i < n for i in local):
        raise ValueError(f"l_layers {sorted(local)} outside 0..{n - 1}")
    epsilon = report.epsilon
    if epsilon is not None and len(epsilon) != n:
        raise ValueError(f"epsilon has {len(epsilon)} entries for {n} layers")
    cells = []
    for i in range(n):
        state = "L" if i in local else "F"
        title = f"layer {i}: {'local (L)' if state == 'L' else 'full attention (F)'}"
        eps_text = ""
        if epsilon is not None and epsilon[i] is not None and math.isfinite(epsilon[i]):
            title += f", ε = {float(epsilon[i]):.3e}"
            eps_text = f"<br><small>{float(epsilon[i]):.1e}</small>"
        elif epsilon is not None:  # a layer without statistics (None), or a non-finite ε
            title += ", ε not measured"
            eps_text = "<br><small>ε n/a</small>"
        style = _CELL_STYLE + (_L_STYLE if state == "L" else _F_STYLE)
        cells.append(
            f'<div data-layer="{i}" data-state="{state}" title="{escape(title)}" style="{style}">'
            f"{i} {state}{eps_text}</div>"
        )
    header = (
        f"<b>{len(local)} of {n} layers local (L)</b> · phase: {escape(report.phase)}"
        f" · recalibrations: {report.recalibrations}"
    )
    grid = "display:grid;grid-template-columns:repeat(auto-fill,minmax(52px,1fr));gap:3px;margin-top:4px;"
    return f'<div class="layer-map"><div>{header}</div><div style="{grid}">{"".join(cells)}</div></div>'


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def format_bytes(count: float) -> str:
    """Bytes in the unit that keeps a few significant digits: the tiny model holds kilobytes, 14B gigabytes."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f'<th style="{_TD_STYLE}">{escape(h)}</th>' for h in head)
    body = "".join(
        "<tr>" + "".join(f'<td style="{_TD_STYLE}">{c}</td>' for c in row) + "</tr>" for row in rows
    )
    return f'<table style="{_TABLE_STYLE}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def run_summary_html(
    reports: Sequence[ChunkReport], mux_seconds: Mapping[int, float] | None = None, max_rows: int = 8
) -> str:
    """Statistics memory and per-chunk timings (model, decode, mux, LSE merge) of the latest chunks.

    `mux_seconds` maps chunk index to the app's own time writing that chunk's media.
    """
    if not reports:
        return "<div>No chunks yet.</div>"
    mux = mux_seconds or {}
    engines = [r.engine for r in reports]
    stats_now = format_bytes(engines[-1].stats_bytes)
    stats_peak = format_bytes(max(e.stats_bytes for e in engines))
    absorb_total = sum(e.absorb_seconds for e in engines)
    lines = [
        f"Statistics memory: <b>{stats_now}</b> now, {stats_peak} at most (held during warmup only).",
        f"Absorb step: {absorb_total:.3f} s in all.",
    ]
    rows = [
        [
            str(r.engine.index),
            escape(r.engine.phase),
            _seconds(r.timings.model_seconds),
            _seconds(r.timings.decode_seconds),
            _seconds(mux.get(r.engine.index)),
            _seconds(r.engine.merge_seconds),
            format_bytes(r.engine.kv_bytes),
        ]
        for r in reports[-max_rows:]
    ]
    totals = [
        "<b>all</b>",
        f"{len(reports)} chunks",
        _seconds(sum(r.timings.model_seconds for r in reports)),
        _seconds(sum(r.timings.decode_seconds for r in reports)),
        _seconds(sum(mux.get(e.index, 0.0) for e in engines)),
        _seconds(sum(e.merge_seconds for e in engines)),
        "",
    ]
    head = ["chunk", "phase", "model s", "decode s", "mux s", "merge s", "KV"]
    summary = "".join(f"<div>{line}</div>" for line in lines)
    return f'<div class="run-summary">{summary}{_table(head, [*rows, totals])}</div>'


def drift_table_html(drifts: Sequence[ChunkDrift]) -> str:
    """Per-chunk PSNR/SSIM between the Full and ISPA runs; identical chunks say so instead of 'inf dB'."""
    rows = [
        [
            str(d.index),
            "identical" if math.isinf(d.psnr_db) else f"{d.psnr_db:.2f}",
            f"{d.ssim:.4f}",
        ]
        for d in drifts
    ]
    return _table(["chunk", "PSNR dB", "SSIM"], rows)
