"""Side-panel builders: the KV plot table, the layer map and the timing table, checked against the reports."""

from __future__ import annotations

from dataclasses import replace
from html.parser import HTMLParser
from itertools import accumulate

import numpy as np
import pandas as pd
import pytest

from app.inputs import COMPARE, FULL, ISPA
from app.metrics import ChunkDrift
from app.panels import (
    FULL_RING,
    FULL_RUN,
    FULL_UNBOUNDED,
    HEADROOM,
    ISPA_RUN,
    THIS_RUN,
    KVTimeline,
    drift_table_html,
    format_bytes,
    layer_map_html,
    run_summary_html,
)
from app.run_view import (
    RECALIBRATE_FULL,
    RECALIBRATE_IDLE,
    RECALIBRATE_READY,
    RECALIBRATE_ZERO_GPU,
    recalibrate_state,
    timeline_for,
)
from avatars.base import ChunkReport, ChunkTimings
from ispa.report import BlockReport

N_LAYERS = 10
GB = 1e9


def make_report(
    index: int, *, absorbed_from: int = 4, l_layers=(1, 4, 7), event: str | None = None
) -> ChunkReport:
    """A chunk report as a backend yields it: the engine's `BlockReport` plus the backend's timings.
    Warmup until `absorbed_from`, then the L-layers are local."""
    absorbed = index >= absorbed_from
    per_layer = [0 if absorbed and i in l_layers else int(2.5e9) + index * 1_000_000 for i in range(N_LAYERS)]
    engine = BlockReport(
        index=index,
        phase="absorbed" if absorbed else "warmup",
        kv_bytes=sum(per_layer),
        kv_bytes_per_layer=per_layer,
        kv_bytes_full_ring=int(2.5e10) + index * 10_000_000,
        kv_bytes_full_unbounded=int(2.5e10) * (index + 1),
        stats_bytes=0 if absorbed else int(2.1e9),
        epsilon=[0.01 * (i + 1) for i in range(N_LAYERS)] if absorbed else None,
        l_layers=list(l_layers) if absorbed else [],
        merge_seconds=0.0 if absorbed else 0.05 + index / 100,
        absorb_seconds=0.8 if index == absorbed_from else 0.0,
        history_mass=[0.5] * N_LAYERS,
        recalibrations=0,
        event=event if event is not None else ("absorbed" if index == absorbed_from else None),
    )
    timings = ChunkTimings(model_seconds=1.0 + index / 10, decode_seconds=0.2 + index / 100)
    return ChunkReport(engine=engine, timings=timings, frames=12, end_seconds=(index + 1) * 0.48)


def engine(index: int, **changes) -> BlockReport:
    """The engine part of `make_report(index)`, with some fields changed."""
    return replace(make_report(index, **changes.pop("make", {})).engine, **changes)


DURATIONS = [9 / 25] + [12 / 25] * 7


def test_kv_timeline_tracks_this_run_and_both_baselines() -> None:
    reports = [make_report(i).engine for i in range(8)]
    timeline = KVTimeline()
    for report, seconds in zip(reports, DURATIONS, strict=True):
        timeline.add(report, seconds)
    assert timeline.unit() == ("GB", 1e9)
    df = timeline.dataframe()
    assert list(df.columns) == ["t_seconds", "kv_cache", "series"]
    ends = list(accumulate(DURATIONS))
    for series, key in [
        (THIS_RUN, "kv_bytes"),
        (FULL_RING, "kv_bytes_full_ring"),
        (FULL_UNBOUNDED, "kv_bytes_full_unbounded"),
    ]:
        part = df[df.series == series]
        values = [getattr(r, key) / GB for r in reports]
        # A step: each chunk's value is held from its end to the next chunk's end, where the curve jumps.
        steps_t = [ends[0]] + [t for t in ends[1:] for _ in range(2)]
        steps_v = [values[0]] + [v for pair in zip(values, values[1:], strict=False) for v in pair]
        np.testing.assert_allclose(part.t_seconds, steps_t, rtol=0, atol=1e-12)
        np.testing.assert_allclose(part.kv_cache, steps_v, rtol=1e-12)
    # The drop of the absorb (chunk 4) happens at the absorb's moment, not during the chunk before it.
    this_run = df[df.series == THIS_RUN]
    after_absorb = this_run[this_run.kv_cache == reports[4].kv_bytes / GB]
    assert after_absorb.t_seconds.min() == pytest.approx(ends[4])
    marker = df[df.series == "absorbed"]
    assert marker.t_seconds.tolist() == pytest.approx([ends[4], ends[4]])
    # The marker spans the axis, whose top is above every series but the unbounded one (which leaves the plot).
    assert marker.kv_cache.tolist() == pytest.approx([0.0, timeline.y_top()])
    fitted = df[df.series.isin([THIS_RUN, FULL_RING])].kv_cache.max()
    assert fitted < timeline.y_top() <= 1.5 * HEADROOM * fitted
    assert timeline.annotation() == f"green line: absorbed at {ends[4]:.2f} s"


def test_kv_timeline_picks_a_unit_that_fits_the_numbers() -> None:
    timeline = KVTimeline()
    small = replace(engine(0), kv_bytes=2_600, kv_bytes_full_ring=2_600, kv_bytes_full_unbounded=1_000)
    timeline.add(small, 0.36)
    assert timeline.unit() == ("kB", 1e3)
    assert timeline.dataframe().kv_cache.max() == pytest.approx(2.6)
    assert "Full (ring)" in timeline.legend() and "bounded by the ring" in timeline.legend()


def test_kv_timeline_before_absorption_says_warmup() -> None:
    timeline = KVTimeline()
    timeline.add(engine(0), 0.36)
    assert "warmup" in timeline.annotation()
    assert set(timeline.dataframe().series) == {THIS_RUN, FULL_RING, FULL_UNBOUNDED}


def test_kv_timeline_compare_mode_keeps_a_clock_per_run() -> None:
    timeline = KVTimeline((FULL_RUN, ISPA_RUN), ())
    for i, seconds in enumerate(DURATIONS[:6]):
        full = engine(i, event=None, kv_bytes=int(2.5e10))
        timeline.add(full, seconds, run=FULL_RUN)
        timeline.add(engine(i), seconds, run=ISPA_RUN)
    df = timeline.dataframe()
    assert set(df.series) == {FULL_RUN, ISPA_RUN, "absorbed"}
    ends = list(accumulate(DURATIONS[:6]))
    steps = [ends[0]] + [t for t in ends[1:] for _ in range(2)]
    for run in (FULL_RUN, ISPA_RUN):
        np.testing.assert_allclose(df[df.series == run].t_seconds, steps, atol=1e-12)
    assert (df[df.series == FULL_RUN].kv_cache == 25.0).all()
    with pytest.raises(ValueError, match="run must be one of"):
        timeline.add(engine(6), 0.48, run=THIS_RUN)
    with pytest.raises(ValueError, match="run must be one of"):
        KVTimeline().add(engine(0), 0.36, run=ISPA_RUN)
    with pytest.raises(ValueError, match="baselines come from a lone run"):
        KVTimeline((FULL_RUN, ISPA_RUN), (FULL_RING,))
    assert timeline.annotation() == f"green line: {ISPA_RUN} absorbed at {ends[4]:.2f} s"


def test_every_event_gets_its_own_vertical_line() -> None:
    timeline = KVTimeline()
    events = [None, "absorbed", None, "recalibration_started", None, "absorbed"]
    for i, event in enumerate(events):
        timeline.add(engine(i, make={"absorbed_from": 99}, event=event), 0.5)
    df = timeline.dataframe()
    markers = df[~df.series.isin([THIS_RUN, FULL_RING, FULL_UNBOUNDED])]
    assert markers.groupby("series").t_seconds.apply(list).to_dict() == {
        "absorbed": [1.0, 1.0],
        "recalibration": [2.0, 2.0],
        "absorbed 2": [3.0, 3.0],
    }
    with pytest.raises(ValueError, match="unknown report event"):
        timeline.add(engine(9, event="exploded"), 0.5)


def test_kv_dataframe_is_accepted_by_gradio_lineplot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    timeline = KVTimeline()
    for i, seconds in enumerate(DURATIONS):
        timeline.add(engine(i), seconds)
    plot = gr.LinePlot(x="t_seconds", y="kv_cache", color="series")
    payload = plot.postprocess(timeline.dataframe())
    dumped = payload.model_dump()
    assert dumped["datatypes"] == {
        "t_seconds": "quantitative",
        "kv_cache": "quantitative",
        "series": "nominal",
    }
    assert len(dumped["data"]) == len(timeline.dataframe())


class CellParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if "data-layer" in found:
            self.cells.append(found)


class TableParser(HTMLParser):
    """Rows of the first table as lists of cell texts (header row first)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.rows[-1].append("")
            self._in_cell = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.rows[-1][-1] += data


def parse_table(html: str) -> pd.DataFrame:
    parser = TableParser()
    parser.feed(html)
    head, *rows = parser.rows
    return pd.DataFrame(rows, columns=head)


def as_floats(values: pd.Series) -> list[float]:
    return [float(v) for v in values]


def parse_cells(html: str) -> list[dict[str, str | None]]:
    parser = CellParser()
    parser.feed(html)
    return parser.cells


def test_layer_map_lists_every_layer_once_with_its_state_and_epsilon() -> None:
    report = engine(5)
    html = layer_map_html(report)
    cells = parse_cells(html)
    assert [int(c["data-layer"]) for c in cells] == list(range(N_LAYERS))
    assert [c["data-state"] for c in cells] == ["L" if i in (1, 4, 7) else "F" for i in range(N_LAYERS)]
    for i, cell in enumerate(cells):
        assert f"ε = {report.epsilon[i]:.3e}" in cell["title"]
    assert "3 of 10 layers local (L)" in html and "recalibrations: 0" in html
    assert "<link" not in html and "<script" not in html and "<style" not in html


def test_layer_map_during_warmup_has_no_epsilon_and_no_local_layer() -> None:
    cells = parse_cells(layer_map_html(engine(0)))
    assert len(cells) == N_LAYERS and {c["data-state"] for c in cells} == {"F"}
    assert all("ε" not in c["title"] for c in cells)


def test_layer_map_shows_unmeasured_epsilon() -> None:
    epsilon = [0.5, None] + [0.1] * (N_LAYERS - 2)
    cells = parse_cells(layer_map_html(engine(5, epsilon=epsilon)))
    assert cells[1]["title"] == "layer 1: local (L), ε not measured"
    assert cells[0]["title"] == "layer 0: full attention (F), ε = 5.000e-01"


def test_layer_map_escapes_and_checks_the_report() -> None:
    html = layer_map_html(engine(5, phase="<script>alert(1)</script>"))
    assert "<script>" not in html and "&lt;script&gt;" in html
    with pytest.raises(ValueError, match="outside 0..9"):
        layer_map_html(engine(5, make={"l_layers": (3, 10)}))
    with pytest.raises(ValueError, match="epsilon has 3 entries for 10 layers"):
        layer_map_html(engine(5, epsilon=[0.1, 0.2, 0.3]))


def test_run_summary_shows_statistics_memory_and_timings() -> None:
    reports = [make_report(i) for i in range(10)]
    mux = {i: 0.01 * (i + 1) for i in range(10)}
    html = run_summary_html(reports, mux, max_rows=3)
    table = parse_table(html)
    assert table.chunk.tolist() == ["7", "8", "9", "all"]
    assert table.phase.tolist()[:3] == ["absorbed"] * 3
    last = reports[7:]
    assert as_floats(table["model"][:3]) == pytest.approx([r.timings.model_seconds for r in last], abs=5e-4)
    assert as_floats(table["decode"][:3]) == pytest.approx([r.timings.decode_seconds for r in last], abs=5e-4)
    assert as_floats(table["mux"][:3]) == pytest.approx([mux[i] for i in (7, 8, 9)], abs=5e-4)
    assert table["KV"][:3].tolist() == [f"{r.engine.kv_bytes / GB:.2f} GB" for r in last]
    assert float(table["model"].iloc[-1]) == pytest.approx(
        sum(r.timings.model_seconds for r in reports), abs=5e-4
    )
    assert float(table["mux"].iloc[-1]) == pytest.approx(sum(mux.values()), abs=5e-4)
    assert float(table["merge"].iloc[-1]) == pytest.approx(
        sum(r.engine.merge_seconds for r in reports), abs=5e-4
    )
    assert "Statistics memory: <b>0 B</b> now, 2.10 GB at most" in html
    assert "Absorb step: 0.800 s in all." in html


def test_run_summary_without_mux_times_and_without_reports() -> None:
    html = run_summary_html([make_report(0)])
    assert parse_table(html)["mux"].tolist() == ["—", "0.000"]
    assert "Statistics memory: <b>2.10 GB</b> now" in html
    assert run_summary_html([]) == "<div>No chunks yet.</div>"


def test_chunk_report_json_keeps_the_report_files_schema() -> None:
    """The report files (CLI and app) hold the engine's fields plus the backend's, flat, as before."""
    report = make_report(5)
    flat = report.to_dict()
    assert flat == report.engine.to_dict() | {
        "seconds": report.timings.model_seconds,
        "decode_seconds": report.timings.decode_seconds,
        "decode_hidden_seconds": report.timings.decode_hidden_seconds,
        "num_layers": N_LAYERS,
        "frames": 12,
        "t_seconds": report.end_seconds,
    }


def test_drift_table_marks_identical_chunks() -> None:
    html = drift_table_html([ChunkDrift(0, float("inf"), 1.0), ChunkDrift(1, 31.4159, 0.98765)])
    table = parse_table(html)
    assert table.chunk.tolist() == ["0", "1"]
    assert table["PSNR dB"].tolist() == ["identical", "31.42"]
    assert table["SSIM"].tolist() == ["1.0000", "0.9877"]


def test_drift_table_has_a_column_pair_per_compared_run_and_marks_pending_chunks() -> None:
    drifts = {
        "Evict": [ChunkDrift(0, float("inf"), 1.0), ChunkDrift(1, 30.0, 0.9)],
        "Window": [ChunkDrift(0, 40.0, 0.99)],
    }
    table = parse_table(drift_table_html(drifts))
    assert list(table.columns) == [
        "chunk", "Evict vs Full PSNR dB", "Evict vs Full SSIM", "Window vs Full PSNR dB", "Window vs Full SSIM"
    ]  # fmt: skip
    assert table["Evict vs Full PSNR dB"].tolist() == ["identical", "30.00"]
    assert table["Window vs Full PSNR dB"].tolist() == ["40.00", "…"]  # chunk 1 still being computed


def test_kv_timeline_compare_mode_plots_the_two_chosen_runs() -> None:
    timeline = timeline_for(COMPARE, ("Evict", "Window"))
    timeline.add(engine(0, event="evicted"), 0.36, run="Evict run")
    timeline.add(engine(0, event="evicted"), 0.36, run="Window run")
    assert set(timeline.dataframe().series) == {"Evict run", "Window run", "evicted", "evicted 2"}
    assert timeline.legend().startswith("Evict run / Window run:")
    with pytest.raises(ValueError, match="run must be one of"):
        timeline.add(engine(1), 0.48, run=FULL_RUN)


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (999, "999 B"), (99_328, "99.33 kB"), (1_343_488, "1.34 MB"), (33_310_000_000, "33.31 GB")],
)
def test_bytes_are_shown_in_a_readable_unit(count, text) -> None:
    assert format_bytes(count) == text


def test_layer_map_names_the_phase_its_cells_show() -> None:
    """The chunk that absorbs was made in warmup, but its map already shows the L-layers: say "absorbed"."""
    html = layer_map_html(engine(4, phase="warmup"))  # the engine's report of the absorbing block
    assert "phase: absorbed" in html and "3 of 10 layers local (L)" in html
    assert "phase: warmup" in layer_map_html(engine(2))
    assert "phase: recalibrating" in layer_map_html(
        engine(6, event="recalibration_started", phase="absorbed")
    )


MB = 1e6


def tiny_like_reports(chunks: int, policy: str) -> list[BlockReport]:
    """Reports shaped like the tiny model's (issue 23): the ring fills in three chunks (1.00, 1.75, 2.52 MB), the
    unbounded history grows 0.77 MB a chunk, and an ISPA run drops to 1.34 MB at its absorb (chunk 4)."""
    ring = [1.0, 1.75, 2.52]
    reports = []
    for i in range(chunks):
        full_ring = ring[min(i, 2)] * MB
        absorbed = policy == ISPA and i >= 4
        event = "absorbed" if policy == ISPA and i == 4 else None
        reports.append(
            engine(
                i,
                make={"absorbed_from": 4 if policy == ISPA else 10**6},
                phase="full" if policy == FULL else ("absorbed" if absorbed else "warmup"),
                kv_bytes=int(1.34 * MB) if absorbed else int(full_ring),
                kv_bytes_full_ring=int(full_ring),
                kv_bytes_full_unbounded=int((1.0 + 0.77 * i) * MB) if i >= 3 else int(full_ring),
                event=event,
            )
        )
    return reports


def play(timeline: KVTimeline, reports: list[BlockReport]) -> KVTimeline:
    for i, report in enumerate(reports):
        timeline.add(report, DURATIONS[0] if i == 0 else 0.48)
    return timeline


def test_the_absorb_drop_is_a_visible_step_after_a_16_s_clip() -> None:
    """Issue 23: after 16 s the unbounded baseline reaches about 27 MB; the axis must not be stretched to hold
    it, or the 2.52 -> 1.34 MB drop sits at the axis' floor."""
    chunks = 1 + round((16 - DURATIONS[0]) / 0.48)
    timeline = play(timeline_for(ISPA), tiny_like_reports(chunks, ISPA))
    df = timeline.dataframe()
    assert df[df.series == FULL_UNBOUNDED].kv_cache.max() > 25  # MB: the line that set the old axis
    assert (2.52 - 1.34) / timeline.y_top() >= 0.25  # the drop spans a quarter of the axis or more
    assert timeline.y_top() > 2.52
    assert any(f"{FULL_UNBOUNDED} leaves the plot at" in note for note in timeline.notes())
    assert f"{FULL_UNBOUNDED} leaves the plot" in timeline.caption()
    assert timeline.legend_series() == [THIS_RUN, FULL_RING, FULL_UNBOUNDED]


@pytest.mark.parametrize(("policy", "chunks"), [(FULL, 2), (FULL, 8), (ISPA, 2), (ISPA, 8), (COMPARE, 8)])
def test_the_legend_names_only_lines_that_can_be_seen(policy: str, chunks: int) -> None:
    """A series drawn under a later-drawn one over its whole length is not in the legend but named in the
    caption: a Full run's "Full (ring)" is that run itself (issue 23: "this run" under "Full (ring)")."""
    timeline = timeline_for(policy)
    if policy == COMPARE:
        for i, (full, ispa) in enumerate(
            zip(tiny_like_reports(chunks, FULL), tiny_like_reports(chunks, ISPA), strict=True)
        ):
            seconds = DURATIONS[0] if i == 0 else 0.48
            timeline.add(full, seconds, run=FULL_RUN)
            timeline.add(ispa, seconds, run=ISPA_RUN)
    else:
        play(timeline, tiny_like_reports(chunks, policy))
    df = timeline.dataframe()
    drawn = [name for name in timeline.series() if name in set(df.series)]  # in drawing order
    legend = timeline.legend_series()
    for name in legend:
        points = set(zip(df[df.series == name].t_seconds, df[df.series == name].kv_cache, strict=True))
        for later in drawn[drawn.index(name) + 1 :]:
            over = set(zip(df[df.series == later].t_seconds, df[df.series == later].kv_cache, strict=True))
            assert not points <= over, f"{name} is named in the legend but drawn under {later}"
    for name in set(drawn) - set(legend):
        assert f"{name} is drawn under" in timeline.caption()
    if policy == FULL:
        assert FULL_RING not in legend and THIS_RUN in legend
    if policy == COMPARE and chunks > 4:  # the runs part at the absorb
        assert legend == [FULL_RUN, ISPA_RUN]


def test_full_mode_says_what_full_does() -> None:
    """Issue 23: a Full run's caption said "No layer has gone local yet (warmup)", its memory panel showed
    warmup and absorb statistics."""
    reports = tiny_like_reports(6, FULL)
    caption = play(timeline_for(FULL), reports).caption()
    assert "No layer has gone local yet" not in caption and "(warmup)" not in caption
    assert caption.startswith("Full: every layer keeps attending to its whole cached history")
    assert "no absorb" in caption
    ispa = play(timeline_for(ISPA), tiny_like_reports(2, ISPA)).caption()
    assert ispa.startswith("No layer has gone local yet (warmup)")
    chunk_reports = [
        ChunkReport(engine=r, timings=ChunkTimings(1.0, 0.2), frames=12, end_seconds=1.0) for r in reports
    ]
    summary = run_summary_html(chunk_reports)
    assert "warmup" not in summary and "Absorb step" not in summary
    assert "Full run: it gathers no attention statistics" in summary and "never absorbs" in summary


@pytest.mark.parametrize(
    ("running", "ispa_runs", "zero_gpu", "expected"),
    [
        (False, 0, False, (False, RECALIBRATE_IDLE)),
        (True, 0, False, (False, RECALIBRATE_FULL)),
        (True, 1, False, (True, RECALIBRATE_READY)),
        (True, 1, True, (False, RECALIBRATE_ZERO_GPU)),
    ],
)
def test_recalibrate_is_on_only_while_an_ispa_run_streams(running, ispa_runs, zero_gpu, expected) -> None:
    assert recalibrate_state(running, ispa_runs, zero_gpu) == expected


class TimelinePanels:
    """The part of `app.run_view.RunPanels` the step's updates read, over a real timeline."""

    def __init__(self) -> None:
        self.timeline = timeline_for(ISPA)
        self.shown_plot_props = None

    def plot(self) -> pd.DataFrame:
        return self.timeline.dataframe()

    def plot_props(self, plot: pd.DataFrame) -> dict:
        return {
            "caption": self.timeline.caption(),
            "colors_in_legend": self.timeline.legend_series(),
            "y_lim": [0.0, self.timeline.y_top()],
        }

    def layer_map(self) -> str:
        return "layers"

    def summary(self) -> str:
        return "summary"

    def drift(self) -> str:
        return ""


def test_the_plot_data_go_before_a_redraw_and_a_step_without_one_sends_one_update() -> None:
    """Issue 23: the plot lagged the caption and the layer map by one chunk. The browser applies an update's
    properties before its value (Gradio sends "value" last) and redraws from scratch on a property change, so a
    step whose plot properties change sends the new data first, alone."""
    import gradio as gr

    from app.generation import _outputs
    from app.layout import RunOutputs

    panels = TimelinePanels()
    plot_at = RunOutputs.position("kv_plot")
    reports = tiny_like_reports(8, ISPA)
    sizes = []
    for i, report in enumerate(reports):
        panels.timeline.add(report, DURATIONS[0] if i == 0 else 0.48)
        updates = [u.as_list() for u in _outputs([(ISPA, None)], {}, panels, f"{i + 1} chunks")]
        sizes.append(len(updates))
        *first, last = updates
        expected = panels.plot()
        for update in first:  # the new data alone, every other output left as it is
            assert update[plot_at].constructor_args == {"value": update[plot_at].constructor_args["value"]}
            pd.testing.assert_frame_equal(update[plot_at].constructor_args["value"], expected)
            assert all(v == gr.skip() for j, v in enumerate(update) if j != plot_at)
        pd.testing.assert_frame_equal(last[plot_at].constructor_args["value"], expected)
        assert last[plot_at].constructor_args["caption"] == panels.timeline.caption()
        assert last[RunOutputs.position("status")] == f"{i + 1} chunks"
    # The legend changes when the baselines part from the run and at the absorb; a step that changes none of
    # the plot's properties is one update (the legend list is not sent again: the page would redraw for it).
    assert sizes[0] == 2 and 1 in sizes
    assert sizes[-1] == 1 and "colors_in_legend" not in last[plot_at].constructor_args
