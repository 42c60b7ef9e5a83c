"""One generation request, run: the backend's chunk streams in, per chunk the new video segment(s), the side
panel and the status out, and at the end the final mp4(s) and the report.

This is the part that holds the GPU (the `spaces.GPU`-decorated generator on a ZeroGPU Space). Compare mode
opens a stream per policy on the same pipeline (A and B, Full vs ISPA by default, plus a Full run when neither
is Full, to measure their drift against): the first run goes first, alone, until its chunks fill its first video
segment (so the first player starts about when a lone run's would, and the others' set-up waits until then), then
they take turns chunk by chunk. The chunks are made on a thread of their own (`app.prefetch`), so Gradio's encoding
of each output never holds up the model. Each chunk is handed out as soon as it exists, except that the first
video segments of speech of known length are held back just long enough for playback not to stop at the rate
measured so far (`app.playback`, `app.pacing`); each step yields `app.layout.RunOutputs` of values, by name.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import gradio as gr

from app.gpu import ON_ZERO_GPU, gpu, gpu_budget
from app.inputs import ISPA, RunSpec
from app.layout import RunOutputs
from app.media import RunDir, ffmpeg_status
from app.models import pipeline_pool
from app.playback import Playback
from app.prefetch import Prefetch
from app.run_recorder import MIN_SEGMENT_SECONDS, RunRecorder
from app.run_view import DelayMeter, RunPanels, run_report, status_markdown
from app.sessions import SESSIONS, FinalOutputs
from app.validation import MAX_AUDIO_SECONDS, ValidationError
from app.worker_pool import on_device
from avatars.base import AvatarBackend, AvatarChunk, GenerationRequest, RunControl

logger = logging.getLogger(__name__)
LEGEND = "colors_in_legend"


def gpu_seconds(spec: RunSpec, model: str, session: str, live: bool) -> int:
    """The GPU time one request asks ZeroGPU for (`app.gpu_time`); spaces calls it with the call's arguments.
    Never more than a call may take: longer speech is refused before (`check_gpu_time`)."""
    budget = gpu_budget()
    speech = MAX_AUDIO_SECONDS if spec.speech_seconds is None else spec.speech_seconds
    asked = budget.seconds(speech, len(spec.policies()), spec.max_area)
    return min(asked, int(budget.max_s / budget.duration_factor))


def check_gpu_time(spec: RunSpec, pipe: AvatarBackend) -> None:
    """On ZeroGPU, refuse speech too long for one call of a model on the GPU (before any GPU time is asked)."""
    if ON_ZERO_GPU and pipe.device.type == "cuda" and spec.speech_seconds is not None:
        gpu_budget().check(spec.speech_seconds, len(spec.policies()), spec.max_area, spec.size_label)


def run_generation(spec: RunSpec, model: str, session: str, live: bool) -> Iterator[RunOutputs[Any]]:
    """Stream the run(s) of one request: per step the new video segment(s), the side panel and the status;
    at the end the final mp4(s) and the report. Compare mode's two runs take turns (see the module).
    On ZeroGPU a model on the GPU runs in a call that borrows one (`app.gpu`); a model on the CPU (the tiny
    one) runs here and spends no GPU time."""
    on_gpu = ON_ZERO_GPU and pipeline_pool().pipeline(model).device.type == "cuda"
    yield from (run_with_gpu if on_gpu else run_leased)(spec, model, session, live)


def run_leased(spec: RunSpec, model: str, session: str, live: bool) -> Iterator[RunOutputs[Any]]:
    """The request on one free pipeline of the pool (`app.worker_pool`), held from start to end."""
    with pipeline_pool().lease(model) as pipe:
        yield from _run_on(pipe, spec, session, live)


run_with_gpu = gpu(duration=gpu_seconds)(run_leased)


def _run_on(pipe: AvatarBackend, spec: RunSpec, session: str, live: bool) -> Iterator[RunOutputs[Any]]:
    streaming = ffmpeg_status().can_stream
    feed = SESSIONS.feed(session) if live else None
    if live and feed is None:
        raise ValidationError("Start the live microphone first.")
    run_dir = RunDir()
    runs = spec.policies()
    controls = {name: RunControl() for name, _ in runs}
    active = SESSIONS.begin_run(
        session, run_dir, list(controls.values()), [controls[ISPA]] if ISPA in controls else []
    )
    recorders = {name: RunRecorder(run_dir, f"avatar-{name.lower()}.mp4", streaming) for name, _ in runs}
    panels = RunPanels(spec, recorders)
    meter = DelayMeter(feed) if feed is not None else None
    timed_run = spec.shown_runs()[-1]  # in compare mode run B, which follows run A
    playback = Playback([name for name, _ in runs], spec, pipe.size_choices())
    streams: dict[str, Iterator[AvatarChunk]] = {}
    started = time.monotonic()
    first_video_s: float | None = None
    production: Prefetch[dict[str, AvatarChunk]] | None = None
    try:
        for name, policy in runs:
            request = GenerationRequest(
                portrait=spec.portrait,
                audio=spec.audio if feed is None else feed.pieces(pipe.sample_rate),
                sample_rate=pipe.sample_rate,
                prompt=spec.prompt,
                seed=spec.settings.seed,
                policy=policy,
                max_area=spec.max_area,
                kv_format=spec.kv_format,
                refresh_sink=spec.refresh_sink,
                steps=spec.steps,
            )
            chunks = pipe.stream(request, controls[name])
            streams[name] = on_device(pipe.device, chunks)
        # The lead run goes alone until its chunks fill the first segment (decided on the model's thread, as the
        # recorder will cut it), or not at all without streaming.
        lead_name = runs[0][0]
        lead_video_s = [0.0]
        streams[lead_name] = _counted(streams[lead_name], lead_video_s)
        production = Prefetch(
            _take_turns(
                streams, lead_until=lambda: not streaming or lead_video_s[0] >= MIN_SEGMENT_SECONDS - 1e-9
            ),
            clock=lambda: time.monotonic() - started,
            on_stop=lambda: [control.cancel() for control in controls.values()],
        )
        while (made := production.take(playback.wait_s(time.monotonic() - started))) is not None:
            now = time.monotonic() - started
            out: list[dict[str, Path]] = []
            if made:  # one chunk per update, as it is made (False: a hold may have run out meanwhile)
                made_s, step = made
                panels.add(step)
                segments = {name: recorders[name].add(chunk) for name, chunk in step.items()}
                for name in step:
                    playback.made(name, made_s, recorders[name].video_seconds)
                if meter is not None and timed_run in step:
                    meter.chunk_ready(step[timed_run].report.end_seconds)
                    if segments.get(timed_run) is not None:
                        meter.handed_over()
                if first_video_s is None and any(segments.values()):
                    first_video_s = now
                out += playback.due(segments, now)
            out += playback.due({}, now)  # a hold that ran out while no chunk came
            note = playback.note(now, meter is not None)
            status = status_markdown(
                pipe.label, spec, recorders, first_video_s, meter and meter.summary(), "generating"
            )
            for due in out or [{}]:
                yield from _outputs(spec.shown_runs(), due, panels, status + (f"  \n{note}" if note else ""))
                _remove(due)  # Gradio has encoded them into its own stream by the time the generator resumes
        _close(streams)
        last = {name: recorder.finish()[0] for name, recorder in recorders.items()} if streaming else {}
        # What is left goes to the players before the report is written: a player may be waiting for it.
        ending = playback.due({}, time.monotonic() - started, finished=True)
        ending += [tail] if (tail := {name: path for name, path in last.items() if path is not None}) else []
        last = {}
        for due in ending:
            status = status_markdown(
                pipe.label, spec, recorders, first_video_s, meter and meter.summary(), "generating"
            )
            yield from _outputs(spec.shown_runs(), due, panels, status)
            _remove(due)
        if meter is not None:
            meter.handed_over()
        if first_video_s is None:
            first_video_s = time.monotonic() - started
        final = _finish(pipe, spec, recorders, panels, run_dir, first_video_s, meter, active.stop_requested)
        SESSIONS.finish(active, final)
    except BaseException:
        # Stopped (Gradio closes the generator) or failed: the files of what exists go to the session, where
        # the Stop button collects them.
        if production is None or production.stop():
            _close(streams)
        if not active.finished.is_set():
            final = _finish(pipe, spec, recorders, panels, run_dir, first_video_s, meter, stopped=True)
            SESSIONS.finish(active, final)
        raise
    if not streaming and final is not None:
        last = {name: recorder.final_video for name, recorder in recorders.items()}
    state = "stopped" if active.stop_requested else "finished"
    status = status_markdown(pipe.label, spec, recorders, first_video_s, meter and meter.summary(), state)
    yield from _outputs(spec.shown_runs(), last, panels, status, final)


def _counted(chunks: Iterator[AvatarChunk], video_s: list[float]) -> Iterator[AvatarChunk]:
    """`chunks`, adding each one's video seconds to `video_s[0]` as it is made; closing it closes `chunks`."""
    try:
        for chunk in chunks:
            video_s[0] += len(chunk.frames) / chunk.fps
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _take_turns(
    streams: Mapping[str, Iterator[AvatarChunk]], lead_until: Callable[[], bool]
) -> Iterator[dict[str, AvatarChunk]]:
    """Each chunk as its own step, as soon as it exists: the first stream's alone until `lead_until()` says
    its first video is out (the others are not started before), then one chunk from each stream in turn,
    the others first.
    The order changes no chunk: each stream owns its session, decoder cache and random generators."""
    running = dict(streams)
    lead = next(iter(running), None)
    led = False
    while lead is not None and not lead_until():
        chunk = next(running[lead], None)
        if chunk is None:
            del running[lead]
            break
        led = True
        yield {lead: chunk}
    if led and lead in running:  # the others' turn first, so the lead stays as far ahead as it got
        running[lead] = running.pop(lead)
    while running:
        for name, stream in list(running.items()):
            chunk = next(stream, None)
            if chunk is None:
                del running[name]
            else:
                yield {name: chunk}


def _close(streams: Mapping[str, Iterator[AvatarChunk]]) -> None:
    """Close the backend's generators: that frees what their runs hold (KV caches, GPU memory)."""
    for stream in streams.values():
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _remove(paths: Mapping[str, Path | None]) -> None:
    for path in paths.values():
        if path is not None:
            path.unlink(missing_ok=True)


def _finish(
    pipe: AvatarBackend,
    spec: RunSpec,
    recorders: Mapping[str, RunRecorder],
    panels: RunPanels,
    run_dir: RunDir,
    first_video_s: float | None,
    meter: DelayMeter | None,
    stopped: bool,
) -> FinalOutputs | None:
    """Close every run's mp4 and write the report; None when that fails (logged, the run still ends)."""
    try:
        files = []
        for recorder in recorders.values():
            recorder.finish(flush_stream=False)  # no-op when the run already finished normally
            if recorder.final_video is not None:
                files.append(recorder.final_video)
        report = run_report(
            pipe.label,
            pipe.is_test_model,
            spec,
            recorders,
            panels.finish_drifts(),
            first_video_s,
            meter and meter.summary(),
            stopped_early=stopped,
        )
        report_path = run_dir.path / "report.json"
        report_path.write_text(json.dumps(report, indent=1))
        return FinalOutputs(files=[*files, report_path], report=report)
    except Exception:
        logger.exception("could not finish the run's files")
        for recorder in recorders.values():
            recorder.discard()
        return None


def _outputs(
    shown: tuple[str, ...],
    videos: Mapping[str, Path | None],
    panels: RunPanels,
    status: str,
    final: FinalOutputs | None = None,
) -> list[RunOutputs[Any]]:
    """The updates of one step: its values, a player without a new segment skipped (which leaves its stream as
    it is). When the plot's properties change, its new data go first in an update of their own: the browser
    applies an update's properties before its value and redraws the plot from scratch on a property change, so
    in one update the redraw would show the previous step's data."""
    players = [videos.get(shown[i]) if i < len(shown) else None for i in range(2)]
    player_a, player_b = (str(p) if p is not None else gr.skip() for p in players)
    plot = panels.plot()
    props = panels.plot_props(plot)
    last_props, updates = panels.shown_plot_props, []
    if props != last_props:
        updates.append(_plot_only(gr.LinePlot(value=plot)))
        panels.shown_plot_props = props
    if last_props is not None and props[LEGEND] == last_props[LEGEND]:
        # The page compares a list by identity: sent again unchanged, it would redraw the plot all the same.
        props = {name: value for name, value in props.items() if name != LEGEND}
    updates.append(
        RunOutputs(
            player_a=player_a,
            player_b=player_b,
            kv_plot=gr.LinePlot(value=plot, **props),
            layer_map=panels.layer_map(),
            run_summary=panels.summary(),
            drift_table=panels.drift(),
            status=status,
            downloads=[str(p) for p in final.files] if final is not None else gr.skip(),
            report=final.report if final is not None else gr.skip(),
        )
    )
    return updates


def _plot_only(plot: gr.LinePlot) -> RunOutputs[Any]:
    """An update of the plot alone, every other output left as it is."""
    return replace(RunOutputs(*(gr.skip() for _ in fields(RunOutputs))), kv_plot=plot)
