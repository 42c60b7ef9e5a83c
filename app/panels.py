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
FULL_PHASE = "full"  # the phase a Full policy reports for every block (ispa.report)
EVENT_LABELS = {"absorbed": "absorbed", "evicted": "evicted", "recalibration_started": "recalibration"}
_EVENT_COLOR_WORDS = {
    "absorbed": "green",
    "evicted": "green",
    "recalibration": "amber",
}  # the colours app.run_view draws them in
_BASELINE_FIELDS = {FULL_RING: "kv_bytes_full_ring", FULL_UNBOUNDED: "kv_bytes_full_unbounded"}
OFF_SCALE = (FULL_UNBOUNDED,)  # grows with the clip: the axis is not stretched to hold it
HEADROOM = 1.25
_NICE_STEPS = (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10)
ISPA_WARMUP = "No layer has gone local yet (warmup)"
FULL_POLICY = (
    "Full: every layer keeps attending to its whole cached history, bounded by the ring; no warmup statistics, "
    "no absorb, no layer goes local"
)
FULL_MEANING = (
    f"{THIS_RUN}: KV bytes a Full run holds after each chunk (it grows until the ring is full) · {FULL_UNBOUNDED}: "
    "the sink plus every block ever written, i.e. a history without the ring bound."
)
COMPARE_WARMUP = "No compared run has turned a layer local yet (warmup)"


def compare_meaning(runs: Sequence[str]) -> str:
    """What compare mode's plot shows: the named runs' KV bytes ("Full run / ISPA run: …")."""
    return f"{' / '.join(runs)}: the KV bytes each run holds after each chunk."


ISPA_MEANING = (
    f"{THIS_RUN}: KV bytes held after each chunk · {FULL_RING}: what a Full run would hold now, its history "
    f"bounded by the ring (equal to this run until ISPA absorbs) · {FULL_UNBOUNDED}: the sink plus every block "
    "ever written, i.e. a history without the ring bound."
)
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
_TABLE_STYLE = "border-collapse:collapse;font:11px/1.3 sans-serif;"
_TD_STYLE = "padding:1px 2px;border-bottom:1px solid #e5e7eb;text-align:right;white-space:normal;overflow-wrap:anywhere;"  # fits 1280 px wide


class KVTimeline:
    """KV-cache bytes per chunk, gathered as chunks arrive, as a long-format table for `gr.LinePlot`.

    `runs` are the measured runs (one, or several side by side: compare mode's Full and ISPA runs); a lone run
    may also carry `baselines`, the full-cache byte counts the engine reports with each chunk. A chunk's report
    gives the bytes held after the chunk (and after an absorb at its end), so each value is drawn flat from the
    chunk's end to the next chunk's end: a step that falls exactly at the absorb. Absorption and recalibration
    moments are vertical lines in series of their own (two points each, at 0 and at the axis' top). Bytes are
    shown in the unit that fits the largest value (`unit()`).

    What the plot shows must be what it says: the axis fits every series but the unbounded baseline, which grows
    with the clip and would flatten the absorb's drop into the axis' floor (it leaves the plot at the top, and the
    caption says so); a series drawn exactly under another over its whole length is left out of the legend and
    named in the caption instead (`hidden_under`).
    """

    def __init__(
        self,
        runs: Sequence[str] = (THIS_RUN,),
        baselines: Sequence[str] = (FULL_RING, FULL_UNBOUNDED),
        *,
        meaning: str = ISPA_MEANING,
        before_events: str = ISPA_WARMUP,
    ) -> None:
        if not runs or len(set(runs)) != len(runs):
            raise ValueError(f"runs must be distinct names, got {list(runs)}")
        unknown = [b for b in baselines if b not in _BASELINE_FIELDS]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}: choose from {list(_BASELINE_FIELDS)}")
        if baselines and len(runs) != 1:
            raise ValueError("baselines come from a lone run's reports; give one run with them")
        self.runs = tuple(runs)
        self.baselines = tuple(baselines)
        self.meaning = meaning
        self.before_events = before_events
        self._rows: dict[str, list[tuple[float, int]]] = {name: [] for name in self.series()}
        self._clock: dict[str, float] = {}
        self.events: list[tuple[float, str, str]] = []  # (t_seconds, label, run), in arrival order

    def series(self) -> tuple[str, ...]:
        """The byte series in drawing order: baselines first, so that a run is drawn over a baseline it equals."""
        return (*self.baselines, *self.runs)

    def add(self, report: BlockReport, seconds: float, run: str | None = None) -> None:
        """Add one chunk's engine report; `seconds` is the chunk's video duration (its frames / fps)."""
        run = self.runs[0] if run is None and len(self.runs) == 1 else run
        if run not in self.runs:
            raise ValueError(f"run must be one of {self.runs} here, got {run!r}")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds must be positive, got {seconds}")
        event = report.event
        if event is not None and event not in EVENT_LABELS:
            raise ValueError(f"unknown report event {event!r}")
        t = self._clock.get(run, 0.0) + seconds
        self._clock[run] = t
        self._rows[run].append((t, report.kv_bytes))
        for baseline in self.baselines:
            self._rows[baseline].append((t, getattr(report, _BASELINE_FIELDS[baseline])))
        if event is not None:
            self.events.append((t, EVENT_LABELS[event], run))

    def unit(self) -> tuple[str, float]:
        """(unit name, bytes per unit) that fits the largest value so far: the tiny model holds kilobytes."""
        return byte_unit(max((count for rows in self._rows.values() for _, count in rows), default=0))

    def y_top(self) -> float:
        """The top of the axis, in `unit()`: a round number above every series but the unbounded baseline."""
        _, scale = self.unit()
        fitted = [count for name, rows in self._rows.items() if name not in OFF_SCALE for _, count in rows]
        return nice_ceiling(HEADROOM * max(fitted, default=0) / scale)

    def dataframe(self) -> pd.DataFrame:
        """Columns t_seconds, kv_cache (in `unit()`), series: a step per series, plus the event lines."""
        _, scale = self.unit()
        rows: list[tuple[float, float, str]] = []
        for name, points in self._rows.items():
            rows += [(t, value / scale, name) for t, value in _steps(points)]
        top = self.y_top()
        for t, name in self._event_series():
            rows += [(t, 0.0, name), (t, top, name)]
        return pd.DataFrame(rows, columns=["t_seconds", "kv_cache", "series"])

    def _event_series(self) -> list[tuple[float, str]]:
        seen: dict[str, int] = {}
        named = []
        for t, label, _ in self.events:
            seen[label] = seen.get(label, 0) + 1
            named.append((t, label if seen[label] == 1 else f"{label} {seen[label]}"))
        return named

    def hidden_under(self) -> dict[str, str]:
        """{series: the series drawn over it} for each series whose whole line lies under a later-drawn one:
        e.g. a Full run's "Full (ring)" baseline, which is that run itself."""
        hidden = {}
        order = [name for name in self.series() if self._rows[name]]
        for i, name in enumerate(order):
            points = set(_steps(self._rows[name]))
            cover = next((o for o in reversed(order[i + 1 :]) if points <= set(_steps(self._rows[o]))), None)
            if cover is not None:
                hidden[name] = cover
        return hidden

    def legend_series(self) -> list[str]:
        """The series the legend names: every drawn run and baseline that can be seen (runs first). The event
        lines are named in the caption: the legend sits in one row under a narrow plot and must fit it."""
        hidden = self.hidden_under()
        return [name for name in (*self.runs, *self.baselines) if self._rows[name] and name not in hidden]

    def legend(self) -> str:
        """What each curve means, in one line."""
        return self.meaning

    def annotation(self) -> str:
        """The event moments in words (their colour too), or what happens before the first one."""
        if not self.events:
            return self.before_events
        whose = (lambda run: f"{run} ") if len(self.runs) > 1 else (lambda run: "")
        return " · ".join(
            f"{_EVENT_COLOR_WORDS[label]} line: {whose(run)}{label} at {t:.2f} s"
            for t, label, run in self.events
        )

    def notes(self) -> list[str]:
        """What the plot cannot show by itself: series hidden under another, series above the axis' top."""
        notes = [
            f"{name} is drawn under {cover} (equal so far)" for name, cover in self.hidden_under().items()
        ]
        _, scale = self.unit()
        top = self.y_top()
        for name in OFF_SCALE:
            above = [t for t, count in self._rows.get(name, []) if count / scale > top]
            if above:  # no value that changes every chunk: a new caption redraws the whole plot
                notes.append(f"{name} leaves the plot at {above[0]:.2f} s and keeps growing with the clip")
        return notes

    def caption(self) -> str:
        """The events, the notes and the legend's meaning, as the caption under the plot."""
        notes = self.notes()
        head = self.annotation() + (f" ({'; '.join(notes)})" if notes else "")
        return f"{head}. {self.legend()}" if head else self.legend()


def _steps(points: Sequence[tuple[float, int]]) -> list[tuple[float, int]]:
    """A value per chunk end as a step: each value is held until the next chunk's end, where the line jumps."""
    steps: list[tuple[float, int]] = []
    for i, (t, value) in enumerate(points):
        if i:
            steps.append((t, points[i - 1][1]))
        steps.append((t, value))
    return steps


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 (times a power of ten) at or above `value`; 1 for none."""
    if not (math.isfinite(value) and value > 0):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in _NICE_STEPS if step * power >= value * (1 - 1e-9))


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
    if all(e.phase == FULL_PHASE for e in engines):
        # A Full run has no warmup and no absorb: its statistics memory is shown, not explained as ISPA's.
        lines = [
            f"Full run: it gathers no attention statistics (<b>{stats_peak}</b>) and never absorbs; "
            "the KV column is its whole cache."
        ]
    else:
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
    # Units in a line of their own, not in the headers: the table fits the side column at 1280 px.
    lines.append("Seconds per chunk: model, VAE decode, mux (the app's mp4 writing), LSE merge.")
    head = ["chunk", "phase", "model", "decode", "mux", "merge", "KV"]
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
