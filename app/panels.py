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

THIS_RUN = "this run"
FULL_RING = "Full (ring)"
FULL_UNBOUNDED = "Full (no bound)"
FULL_RUN = "Full run"
ISPA_RUN = "ISPA run"
EVENT_LABELS = {"absorbed": "absorbed", "evicted": "evicted", "recalibration_started": "recalibration"}
PHASE_AFTER_EVENT = {"absorbed": "absorbed", "evicted": "evicted", "recalibration_started": "recalibrating"}


def run_label(name: str) -> str:
    """A compare-mode run's series in the KV plot: "Full run", "ISPA run", "Window run", …"""
    return f"{name} run"


# What the panels say before the first chunk, so a new user sees what will appear there.
LAYER_MAP_PLACEHOLDER = (
    "<div class='layer-map'><b>Layers</b>: one cell per self-attention layer appears here with the first chunk, "
    "F for full attention over the history, L once ISPA has made the layer local (its ε on hover).</div>"
)
SUMMARY_PLACEHOLDER = (
    "<div class='run-summary'>Statistics memory, the absorb time and per-chunk timings (model, decode, "
    "mux, LSE merge, KV) appear here while the run streams.</div>"
)

_L_STYLE = "background:#15803d;color:#fff;"
_F_STYLE = "background:#e5e7eb;color:#111827;"
_CELL_STYLE = "border-radius:4px;padding:2px 0;text-align:center;font:11px/1.2 monospace;"
_TABLE_STYLE = "border-collapse:collapse;font:12px/1.4 sans-serif;"
_TD_STYLE = "padding:2px 8px;border-bottom:1px solid #e5e7eb;text-align:right;"


class KVTimeline:
    """KV-cache bytes per chunk, gathered as chunks arrive, as a long-format table for `gr.LinePlot`.

    Single mode plots this run against the two full-cache baselines the engine reports; compare mode plots the
    measured Full and ISPA runs. A chunk's report gives the bytes held after the chunk (and after an absorb at its
    end), so each value is drawn flat from the chunk's end to the next chunk's end: a step that falls exactly at
    the absorb. Absorption and recalibration moments are vertical lines in series of their own (two points each,
    at 0 and at the plot's top). Bytes are shown in the unit that fits the largest value (`unit()`).
    """

    def __init__(self, compare: bool = False, runs: Sequence[str] = (FULL_RUN, ISPA_RUN)) -> None:
        self.compare = compare
        self.runs = tuple(runs)  # compare mode's series, A then B
        self._rows: list[tuple[float, int, str]] = []  # (t_seconds at the chunk's end, bytes, series)
        self._clock: dict[str, float] = {}
        self.events: list[tuple[float, str]] = []  # (t_seconds, label), in arrival order

    def add(self, report: BlockReport, seconds: float, run: str = THIS_RUN) -> None:
        """Add one chunk's engine report; `seconds` is the chunk's video duration (its frames / fps)."""
        allowed = self.runs if self.compare else (THIS_RUN,)
        if run not in allowed:
            raise ValueError(f"run must be one of {allowed} in this mode, got {run!r}")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds must be positive, got {seconds}")
        t = self._clock.get(run, 0.0) + seconds
        self._clock[run] = t
        self._rows.append((t, report.kv_bytes, run))
        if not self.compare:
            self._rows.append((t, report.kv_bytes_full_ring, FULL_RING))
            self._rows.append((t, report.kv_bytes_full_unbounded, FULL_UNBOUNDED))
        event = report.event
        if event is not None:
            if event not in EVENT_LABELS:
                raise ValueError(f"unknown report event {event!r}")
            self.events.append((t, EVENT_LABELS[event]))

    def unit(self) -> tuple[str, float]:
        """(unit name, bytes per unit) that fits the largest value so far: the tiny model holds kilobytes."""
        return byte_unit(max((count for _, count, _ in self._rows), default=0))

    def dataframe(self) -> pd.DataFrame:
        """Columns t_seconds, kv_cache (in `unit()`), series: a step per series, plus the event lines."""
        _, scale = self.unit()
        rows: list[tuple[float, float, str]] = []
        previous: dict[str, float] = {}
        for t, count, series in self._rows:
            value = count / scale
            if series in previous:
                rows.append((t, previous[series], series))  # the value held until this chunk ended
            rows.append((t, value, series))
            previous[series] = value
        top = max((value for _, value, _ in rows), default=0.0) or 1.0
        seen: dict[str, int] = {}
        for t, label in self.events:
            seen[label] = seen.get(label, 0) + 1
            name = label if seen[label] == 1 else f"{label} {seen[label]}"
            rows += [(t, 0.0, name), (t, top, name)]
        return pd.DataFrame(rows, columns=["t_seconds", "kv_cache", "series"])

    def legend(self) -> str:
        """What each curve means, in one line."""
        if self.compare:
            return f"{' / '.join(self.runs)}: the KV bytes each run holds after each chunk."
        return (
            f"{THIS_RUN}: KV bytes held after each chunk · {FULL_RING}: what a Full run would hold now, its "
            f"history bounded by the ring (equal to this run until ISPA absorbs) · {FULL_UNBOUNDED}: the sink plus "
            "every block ever written, i.e. a history without the ring bound."
        )

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
    # The report's phase is the one the chunk was made in; an absorb at its end already shows its L-layers.
    phase_now = PHASE_AFTER_EVENT.get(report.event, report.phase)
    header = (
        f"<b>{len(local)} of {n} layers local (L)</b> · phase: {escape(phase_now)}"
        f" · recalibrations: {report.recalibrations}"
    )
    grid = "display:grid;grid-template-columns:repeat(auto-fill,minmax(52px,1fr));gap:3px;margin-top:4px;"
    return f'<div class="layer-map"><div>{header}</div><div style="{grid}">{"".join(cells)}</div></div>'


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def byte_unit(count: float) -> tuple[str, float]:
    """The unit (name, bytes per unit) that keeps a few significant digits for `count` bytes."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return unit, size
    return "B", 1.0


def format_bytes(count: float) -> str:
    """Bytes in the unit that keeps a few significant digits: the tiny model holds kilobytes, 14B gigabytes."""
    unit, size = byte_unit(count)
    return f"{count:.0f} B" if unit == "B" else f"{count / size:.2f} {unit}"


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


def drift_table_html(drifts: Sequence[ChunkDrift] | Mapping[str, Sequence[ChunkDrift]]) -> str:
    """Per-chunk PSNR/SSIM of each compared run against the Full run (a list: one run, e.g. ISPA; a mapping: by
    run name, a column pair each); identical chunks say so instead of 'inf dB'."""
    by_run = drifts if isinstance(drifts, Mapping) else {"": drifts}
    indices = sorted({d.index for run_drifts in by_run.values() for d in run_drifts})
    cells = {(run, d.index): d for run, run_drifts in by_run.items() for d in run_drifts}
    rows = []
    for index in indices:
        row = [str(index)]
        for run in by_run:
            d = cells.get((run, index))
            if d is None:
                row += ["…", "…"]  # still being computed
            else:
                row += ["identical" if math.isinf(d.psnr_db) else f"{d.psnr_db:.2f}", f"{d.ssim:.4f}"]
        rows.append(row)
    head = ["chunk"]
    for run in by_run:
        prefix = f"{run} vs Full " if run else ""
        head += [f"{prefix}PSNR dB", f"{prefix}SSIM"]
    return _table(head, rows)
