"""What the user sees of a run while it streams and after it ends: the side panels, the status line, the
speech-to-video delay in live mode, and the report that is offered as JSON."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from html import escape
from typing import Any

import pandas as pd

from app.inputs import COMPARE, DEFAULT_COMPARE, FULL, ISPA, RunSpec
from app.live_audio import LiveAudioFeed
from app.metrics import ChunkDrift, chunk_drift
from app.panels import (
    COMPARE_WARMUP,
    FULL_MEANING,
    FULL_POLICY,
    FULL_RING,
    FULL_RUN,
    FULL_UNBOUNDED,
    ISPA_RUN,
    THIS_RUN,
    KVTimeline,
    compare_meaning,
    drift_table_html,
    layer_map_html,
    run_label,
    run_summary_html,
)
from app.run_recorder import RunRecorder
from avatars.base import AvatarChunk

SERIES_COLORS = {
    THIS_RUN: "#4f46e5",
    ISPA_RUN: "#4f46e5",
    FULL_RUN: "#dc2626",
    FULL_RING: "#dc2626",
    FULL_UNBOUNDED: "#9ca3af",
    run_label("Evict"): "#0891b2",
    run_label("Window"): "#7c3aed",
    run_label("Salience"): "#db2777",
}
# by prefix: "absorbed 2" is green too
EVENT_COLORS = {"absorbed": "#15803d", "evicted": "#15803d", "recalibration": "#d97706"}
RECALIBRATE_READY = "Recalibrate: the running ISPA run warms up again from its next block and absorbs anew."
RECALIBRATE_IDLE = "Recalibrate acts on a running ISPA run; none is streaming now."
RECALIBRATE_FULL = "Recalibrate is off: a Full run has no warmup statistics and no absorb to redo."
RECALIBRATE_ZERO_GPU = "Recalibrate is off on ZeroGPU: the request cannot reach the GPU worker mid-run."


def timeline_for(mode: str, compared: Sequence[str] = DEFAULT_COMPARE) -> KVTimeline:
    """The KV plot of a request's mode: its runs (in compare mode the `compared` ones, A then B), the baselines
    drawn with them, and what the caption says."""
    if mode == COMPARE:
        runs = tuple(run_label(name) for name in compared)
        return KVTimeline(runs, (), meaning=compare_meaning(runs), before_events=COMPARE_WARMUP)
    if mode == FULL:
        return KVTimeline(
            (THIS_RUN,), (FULL_RING, FULL_UNBOUNDED), meaning=FULL_MEANING, before_events=FULL_POLICY
        )
    return KVTimeline((THIS_RUN,), (FULL_RING, FULL_UNBOUNDED))


def recalibrate_state(running: bool, ispa_runs: int, zero_gpu: bool = False) -> tuple[bool, str]:
    """Whether Recalibrate can act now, and the line that says why (or why not)."""
    if zero_gpu:
        return False, RECALIBRATE_ZERO_GPU
    if not running:
        return False, RECALIBRATE_IDLE
    if ispa_runs == 0:
        return False, RECALIBRATE_FULL
    return True, RECALIBRATE_READY


class DelayMeter:
    """Live mode's speech-to-video delay, per chunk: from the moment the microphone audio up to the chunk's
    end time had arrived on the server to the moment the video holding that chunk is handed to Gradio.

    It leaves out what happens before the server has the audio (the browser sends a piece every
    `stream_every` seconds) and after the hand-over (Gradio's segment encoding, the browser fetching and
    buffering it); it includes waiting for the model, the VAE, and a segment's worth of chunks.
    """

    def __init__(self, feed: LiveAudioFeed, clock: Callable[[], float] = time.monotonic) -> None:
        self.feed = feed
        self._clock = clock
        self._waiting: list[float] = []  # chunk end times (s of audio) not yet handed over
        self.delays: list[float] = []

    def chunk_ready(self, end_seconds: float) -> None:
        self._waiting.append(end_seconds)

    def handed_over(self) -> None:
        """The video of every waiting chunk is being yielded now."""
        now = self._clock()
        for end in self._waiting:
            arrived = self.feed.arrival_time(end)
            if arrived is not None:
                self.delays.append(now - arrived)
        self._waiting.clear()

    def summary(self) -> dict[str, float | int] | None:
        if not self.delays:
            return None
        return {
            "latest_s": self.delays[-1],
            "mean_s": sum(self.delays) / len(self.delays),
            "max_s": max(self.delays),
            "chunks": len(self.delays),
        }


class RunPanels:
    """The side panel's contents for the run(s) of one request, updated chunk by chunk.

    Compare mode ("A vs B") plots the two shown runs and measures each one's drift (PSNR, SSIM) against the Full
    run, chunk by chunk: Full is A or B, or else a third run made for the purpose. The drift is computed on a
    worker thread, so the generation does not wait for it: the drift table shows, per run, the chunks whose drift
    is done, in chunk order, and `finish_drifts` waits for all.
    """

    def __init__(self, spec: RunSpec, recorders: Mapping[str, RunRecorder]) -> None:
        self.spec = spec
        self.recorders = recorders
        self.compare = spec.mode == COMPARE
        self.shown = spec.shown_runs()
        self.timeline = timeline_for(spec.mode, self.shown)
        self._drift_jobs: dict[str, list[Future[ChunkDrift]]] = {
            name: [] for name in self.shown if self.compare and name != FULL
        }
        self._drift_worker = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift") if self.compare else None
        )
        self._unpaired: dict[str, dict[int, AvatarChunk]] = {name: {} for name in recorders}
        self._paired: dict[int, int] = {}  # chunk index -> compared runs already paired with Full's chunk
        self.shown_plot_props: dict[str, Any] | None = None  # the plot properties last handed to the page

    def add(self, step: Mapping[str, AvatarChunk]) -> None:
        """One step: a new chunk of one run or more (compare mode's runs take turns)."""
        for name, chunk in step.items():
            if name in self.shown:
                run = run_label(name) if self.compare else THIS_RUN
                self.timeline.add(chunk.report.engine, seconds=len(chunk.frames) / chunk.fps, run=run)
            if self._drift_worker is not None:
                self._pair(name, chunk)

    def _pair(self, name: str, chunk: AvatarChunk) -> None:
        """Compare each compared run's chunk with the Full run's chunk of the same index once both exist (each
        run's chunks come in order); Full's chunk is kept until every compared run has been paired with it."""
        index = chunk.index
        self._unpaired[name][index] = chunk
        full = self._unpaired[FULL].get(index)
        if full is None:
            return
        for run, jobs in self._drift_jobs.items():
            other = self._unpaired[run].pop(index, None)
            if other is None:
                continue
            self._paired[index] = self._paired.get(index, 0) + 1
            if other.frames.shape == full.frames.shape:
                jobs.append(self._drift_worker.submit(chunk_drift, index, full.frames, other.frames))
        if self._paired.get(index, 0) == len(self._drift_jobs):
            del self._unpaired[FULL][index]
            self._paired.pop(index, None)

    def ready_drifts(self) -> dict[str, list[ChunkDrift]]:
        """Per compared run, the drifts computed so far, in chunk order (up to the first still being computed)."""
        ready: dict[str, list[ChunkDrift]] = {}
        for run, jobs in self._drift_jobs.items():
            ready[run] = []
            for job in jobs:
                if not job.done():
                    break
                ready[run].append(job.result())
        return ready

    def finish_drifts(self) -> dict[str, list[ChunkDrift]]:
        """Every chunk's drift per compared run, waiting for those still being computed; the worker then ends."""
        drifts = {run: [job.result() for job in jobs] for run, jobs in self._drift_jobs.items()}
        if self._drift_worker is not None:
            self._drift_worker.shutdown()
        return drifts

    def plot(self) -> pd.DataFrame:
        return self.timeline.dataframe()

    def plot_props(self, plot: pd.DataFrame) -> dict[str, Any]:
        """The plot's properties besides its data, as `gr.LinePlot` keywords. Gradio redraws the plot from
        scratch when one of them changes (new data alone is drawn into the old legend, colours and axis)."""
        return {
            "color_map": self.plot_colors(plot),
            "colors_in_legend": self.timeline.legend_series(),
            "caption": self.caption(),
            "y_title": self.plot_y_title(),
            "y_lim": [0.0, self.timeline.y_top()],
        }

    def plot_y_title(self) -> str:
        return f"KV cache ({self.timeline.unit()[0]})"

    def plot_colors(self, plot: pd.DataFrame) -> dict[str, str]:
        """A colour for every series in `plot`: the runs in fixed colours, absorb markers green and
        recalibration markers amber, however many there are."""
        colors = {}
        for series in plot["series"].unique():
            event = next((c for prefix, c in EVENT_COLORS.items() if series.startswith(prefix)), None)
            colors[series] = SERIES_COLORS.get(series, event or "#6b7280")
        return colors

    def caption(self) -> str:
        """The events (or what the policy does before any), what the plot cannot show, and the legend's
        meaning. It changes only with what it says, so the plot is not redrawn from scratch every chunk."""
        return self.timeline.caption()

    def layer_map(self) -> str:
        """The layer map of the run that can have local layers (the ISPA one, else the first shown one that is
        not Full, or the only one)."""
        others = [name for name in self.shown if name != FULL]
        name = ISPA if ISPA in self.recorders else (others or list(self.shown))[0]
        reports = self.recorders[name].reports
        return layer_map_html(reports[-1].engine) if reports else ""

    def summary(self) -> str:
        parts = []
        for name, recorder in self.recorders.items():
            heading = f"<h4>{escape(name)}</h4>" if self.compare else ""
            parts.append(heading + run_summary_html(recorder.reports, recorder.mux_seconds))
        return f'<div style="overflow-x:auto">{"".join(parts)}</div>'

    def drift(self) -> str:
        return drift_table_html(self.ready_drifts()) if self.compare else ""


def status_markdown(
    model_label: str,
    spec: RunSpec,
    recorders: Mapping[str, RunRecorder],
    first_video_s: float | None,
    delay: dict[str, float | int] | None,
    state: str,
) -> str:
    """One or two lines on the run: the model, progress and speed, and in live mode the measured delay."""
    longest = max(recorders.values(), key=lambda r: len(r.reports))
    chunks = len(longest.reports)
    model_s = sum(r.timings.model_seconds for r in longest.reports)
    line = f"**{escape(model_label)}** · {escape(spec.mode)} · {state} · {chunks} chunks · "
    line += f"{longest.video_seconds:.2f} s of video"
    if longest.video_seconds > 0:
        line += f" · model {model_s / longest.video_seconds:.2f} s per second of video"
    if first_video_s is not None:
        line += f" · first video {first_video_s:.2f} s after the start"
    if delay is not None:
        line += (
            f"  \nSpeech → video delay: {delay['latest_s']:.2f} s now, {delay['mean_s']:.2f} s on average, "
            f"{delay['max_s']:.2f} s at most (over {delay['chunks']} chunks)"
        )
    return line


def run_report(
    model_label: str,
    is_test_model: bool,
    spec: RunSpec,
    recorders: Mapping[str, RunRecorder],
    drifts: Mapping[str, Sequence[ChunkDrift]],
    first_video_s: float | None,
    delay: dict[str, float | int] | None,
    stopped_early: bool,
) -> dict[str, Any]:
    """The whole run as JSON-ready data: inputs, the engine's report for every chunk, drift and timings."""
    settings = spec.settings
    return {
        "model": model_label,
        "is_test_model": is_test_model,
        "mode": spec.mode,
        "speech": spec.audio_source,
        "prompt": spec.prompt,
        "settings": {
            "k_fraction": settings.k_fraction,
            "t_warm": settings.t_warm,
            "lam": settings.lam,
            "seed": settings.seed,
            "size": spec.size_label,
            "max_area": spec.max_area,
            "kv_format": spec.kv_format,
            "refresh_sink": spec.refresh_sink,
            "steps": spec.steps,
        },
        "stopped_early": stopped_early,
        "first_video_after_s": first_video_s,
        "speech_to_video_delay": delay,
        "runs": {
            name: {"video_seconds": recorder.video_seconds, "chunks": [r.to_dict() for r in recorder.reports]}
            for name, recorder in recorders.items()
        },
        "drift": [  # each compared run against the Full run, chunk by chunk
            {
                "run": run,
                "index": d.index,
                "psnr_db": d.psnr_db if math.isfinite(d.psnr_db) else None,
                "identical": math.isinf(d.psnr_db),
                "ssim": d.ssim,
            }
            for run, run_drifts in drifts.items()
            for d in run_drifts
        ],
    }
