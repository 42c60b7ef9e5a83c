"""The Gradio app: a portrait and speech in, a talking-head video streamed out while it is generated, with the
ISPA engine's KV-cache memory, layer map and timings beside it.

Order, as in Gradio's own demos: handlers (module-level functions), then `build_demo` with the layout and
the events, then `serve`. The generation itself is `app.generation.run_generation`; per-session server state
(run controls, live microphone audio, run folders) lives in `app.sessions.SESSIONS`, keyed by Gradio's
session hash.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from html import escape
from typing import Any

import gradio as gr

from app.examples import bundled_example
from app.generation import run_generation
from app.gpu import ON_ZERO_GPU
from app.inputs import COMPARE, DEFAULT_SIZE, ISPA, POLICY_CHOICES, RunSpec, prepare_run
from app.live_audio import decode_mic_piece
from app.media import ffmpeg_status, remove_stale_run_dirs, temp_root
from app.models import (
    MODEL_LABELS,
    REAL_MODEL,
    check_model,
    default_model,
    get_pipeline,
    hide_paths,
    model_availability,
)
from app.portrait_input import portrait_image
from app.sessions import SESSIONS, ActiveRun
from app.tts import TextToSpeechError
from app.validation import MAX_AUDIO_SECONDS, ValidationError

logger = logging.getLogger(__name__)

DEFAULT_K_FRACTION = 0.5
DEFAULT_T_WARM = 12
DEFAULT_LAM = 1e-3
DEFAULT_SEED = 42
QUEUE_SIZE = 16
MAX_FILE_SIZE = "50mb"
STALE_RUN_DIR_SECONDS = 3600
STOP_WAIT_SECONDS = 30.0
MIC_STREAM_EVERY_SECONDS = 0.25
MIC_SESSIONS = 8
PLAYER_HEIGHT = 480
# A streamed video sizes itself to the column's width; a tall portrait video would push everything down.
CSS = (
    f"#player_a video, #player_b video {{ max-height: {PLAYER_HEIGHT}px; object-fit: contain; }}"
    " .run-summary table { display: block; overflow-x: auto; font-size: 0.85em; }"
)


# ---------------------------------------------------------------------------------------------------- errors
@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn failures into `gr.Error` messages fit for the browser: input problems as they are, anything else
    as a generic line (the details go to the server log, never to the user)."""
    try:
        yield
    except gr.Error:
        raise
    except (ValidationError, TextToSpeechError) as exc:
        raise gr.Error(_as_text(str(exc))) from None
    except ValueError as exc:  # the backend's own input checks
        raise gr.Error(_as_text(hide_paths(str(exc)))) from None
    except Exception:
        logger.exception("generation failed")
        raise gr.Error(
            "Generation failed because of an internal error; details are in the server log."
        ) from None


def _as_text(message: str) -> str:
    """Gradio shows messages as HTML: escape markup (quotes are harmless in text and read better as is)."""
    return escape(message, quote=False)


def _session(request: gr.Request | None) -> str:
    if request is None or not request.session_hash:
        raise gr.Error("This action needs a browser or gradio_client session.")
    return request.session_hash


# ------------------------------------------------------------------------------------------------ generation
def generate(
    portrait: str | None,
    audio: str | None,
    text: str | None,
    prompt: str | None,
    policy: str,
    k_fraction: float,
    t_warm: float,
    seed: float,
    model: str,
    lam: float = DEFAULT_LAM,
    size: str = DEFAULT_SIZE,
    request: gr.Request = None,
) -> Iterator[tuple]:
    """Generate from a portrait and speech (an audio file, or text spoken offline), streaming the video."""
    session = _session(request)
    with user_errors():
        spec = _prepare(
            portrait, audio, text, prompt, policy, k_fraction, t_warm, seed, model, lam, size, live=False
        )
        yield from run_generation(spec, model, session, False)


def generate_live(
    portrait: str | None,
    prompt: str | None,
    policy: str,
    k_fraction: float,
    t_warm: float,
    seed: float,
    model: str,
    lam: float = DEFAULT_LAM,
    size: str = DEFAULT_SIZE,
    request: gr.Request = None,
) -> Iterator[tuple]:
    """Live mode: generate while the microphone streams into this session's feed."""
    session = _session(request)
    with user_errors():
        try:
            spec = _prepare(
                portrait, None, None, prompt, policy, k_fraction, t_warm, seed, model, lam, size, live=True
            )
        except Exception:
            feed = SESSIONS.feed(session)
            if feed is not None:
                feed.close()
            raise
        yield from run_generation(spec, model, session, True)


def _prepare(
    portrait: str | None,
    audio: str | None,
    text: str | None,
    prompt: str | None,
    policy: str,
    k_fraction: float,
    t_warm: float,
    seed: float,
    model: str,
    lam: float,
    size: str,
    live: bool,
) -> RunSpec:
    pipe = get_pipeline(check_model(model))
    spec = prepare_run(
        portrait=portrait,
        audio=audio,
        text=text,
        prompt=prompt,
        policy=policy,
        k_fraction=k_fraction,
        t_warm=t_warm,
        lam=lam,
        seed=seed,
        size=size,
        size_choices=pipe.size_choices(),
        sample_rate=pipe.sample_rate,
        speech_dir=temp_root(),
        live=live,
    )
    for note in spec.warnings:
        gr.Warning(_as_text(note))
    return spec


# ------------------------------------------------------------------------------------- run and live controls
def stop_run(request: gr.Request = None) -> tuple:
    """Stop this session's run between chunks and hand over its files (what exists so far)."""
    session = _session(request)
    feed = SESSIONS.feed(session)
    if feed is not None:
        feed.close()
    run = SESSIONS.run(session)
    if run is None:
        return gr.skip(), gr.skip()
    run.stop()
    if not run.finished.wait(STOP_WAIT_SECONDS) or run.final is None:
        return gr.skip(), gr.skip()
    return [str(p) for p in run.final.files], run.final.report


def recalibrate(request: gr.Request = None) -> None:
    """Ask the running ISPA run to warm up again and re-absorb (e.g. after the scene changed)."""
    run: ActiveRun | None = SESSIONS.run(_session(request))
    if run is not None and run.recalibrate():
        gr.Info("Recalibration requested: the ISPA run warms up again from its next block.")
    else:
        gr.Warning("No ISPA run is running, so there is nothing to recalibrate.")


def open_live_feed(request: gr.Request = None) -> None:
    SESSIONS.open_feed(_session(request))


def push_live_audio(piece: str | tuple | None, request: gr.Request = None) -> None:
    """One microphone piece from the `.stream()` event into this session's feed."""
    feed = SESSIONS.feed(_session(request))
    if piece is None or feed is None or feed.closed:
        return
    with user_errors():
        rate, samples = decode_mic_piece(piece)
        feed.push(rate, samples)


def close_live_feed(request: gr.Request = None) -> None:
    feed = SESSIONS.feed(_session(request))
    if feed is not None:
        feed.close()


def end_session(request: gr.Request = None) -> None:
    """The tab closed: stop its run and delete its files."""
    if request is not None and request.session_hash:
        SESSIONS.end(request.session_hash)


# -------------------------------------------------------------------------------------------- small updates
def show_mode(policy: str) -> tuple:
    """Compare mode shows a second player and the drift table."""
    compare = policy == COMPARE
    return (
        gr.Video(label="Full" if compare else "Video"),
        gr.Video(visible=compare),
        gr.HTML(visible=compare),
    )


def refresh_sizes(model: str) -> Any:
    """The size choices of the chosen model (loading it on first use)."""
    try:
        pipe = get_pipeline(check_model(model))
    except ValidationError:
        return gr.skip()
    return gr.Dropdown(
        choices=[DEFAULT_SIZE, *(label for label, _ in pipe.size_choices())], value=DEFAULT_SIZE
    )


# ---------------------------------------------------------------------------------------------------- layout
INTRO = (
    "# ispa-avatar\n"
    "A portrait plus speech becomes a talking-head video that streams while it is generated "
    "(LiveAvatar under the ISPA KV-cache engine)."
)
LIVE_HELP = (
    "Press record and speak: the audio streams to the server while you talk and the video follows block "
    "by block (0.48 s of speech each). Stop recording to end the run. The status line shows the measured "
    "delay from your speech reaching the server to its video being handed to the player."
)


def banner_markdown(availability: Mapping[str, str | None], can_stream: bool, stream_message: str) -> str:
    """Plain words on what this machine cannot do: the real model, or streaming video."""
    lines = []
    reason = availability.get(REAL_MODEL)
    if reason is not None:
        lines.append(
            f"**Running without the real model** ({escape(reason)}). The app uses the tiny *untrained test "
            "model* with random weights: its video is noise, but everything around it (streaming, the ISPA "
            "engine, the panels) is the real thing."
        )
    if not can_stream:
        lines.append(f"**No live video stream:** {escape(stream_message)}")
    if ON_ZERO_GPU:
        lines.append("On ZeroGPU, live mode, Stop and Recalibrate cannot reach the GPU worker mid-run.")
    return "\n\n".join(f"⚠️ {line}" for line in lines)


def _example_rows() -> list[list[str]]:
    """The offline example (a photo and synthesised speech); none when espeak-ng is missing."""
    try:
        example = bundled_example()
    except TextToSpeechError as exc:
        logger.warning("no bundled example: %s", exc)
        return []
    return [[str(example.portrait), str(example.audio), example.text]]


def build_demo() -> gr.Blocks:
    """The whole UI; builds no model (the first run, or the first page load, loads it)."""
    availability = model_availability()
    media = ffmpeg_status()
    chosen = default_model()
    real_reason = availability.get(REAL_MODEL)
    with gr.Blocks(title="ispa-avatar", delete_cache=(STALE_RUN_DIR_SECONDS, STALE_RUN_DIR_SECONDS)) as demo:
        gr.Markdown(INTRO)
        banner = banner_markdown(availability, media.can_stream, media.message)
        gr.Markdown(banner, visible=bool(banner), elem_id="banner")
        with gr.Row():
            with gr.Column(scale=1):
                portrait = portrait_image(
                    label="Portrait",
                    sources=["upload", "webcam"],
                    type="filepath",
                    image_mode=None,  # the portrait check converts modes and EXIF rotation itself
                    elem_id="portrait",
                )
                audio = gr.Audio(
                    label="Speech (upload or record)",
                    sources=["upload", "microphone"],
                    type="filepath",
                    elem_id="speech",
                )
                text = gr.Textbox(
                    label="…or text to speak (used when no audio is given)", lines=2, elem_id="tts"
                )
                prompt = gr.Textbox(label="Prompt (optional)", placeholder="a person talks in a warm studio")
                with gr.Accordion("Engine", open=True):
                    policy = gr.Radio(
                        list(POLICY_CHOICES),
                        value=ISPA,
                        label="Policy",
                        info="ISPA turns layers local after warmup; Full keeps every layer's history; "
                        "Compare runs both on the same inputs and seed.",
                    )
                    k_fraction = gr.Slider(
                        0.05, 1.0, value=DEFAULT_K_FRACTION, step=0.05, label="k_fraction",
                        info="Share of layers that become local after warmup.",
                    )  # fmt: skip
                    t_warm = gr.Slider(
                        6, 48, value=DEFAULT_T_WARM, step=3, label="T_warm (latent frames)",
                        info="Warmup before absorbing, at least two blocks (3 latent frames = one 0.48 s block).",
                    )  # fmt: skip
                    lam = gr.Number(value=DEFAULT_LAM, label="λ (ridge regulariser of the absorb)")
                    seed = gr.Number(value=DEFAULT_SEED, precision=0, label="Seed")
                    size = gr.Dropdown(
                        [DEFAULT_SIZE], value=DEFAULT_SIZE, label="Size", allow_custom_value=True
                    )
                    model = gr.Radio(
                        [(MODEL_LABELS.get(name, name), name) for name in availability],
                        value=chosen,
                        label="Model",
                        interactive=real_reason is None,
                        info=f"14B unavailable: {real_reason}" if real_reason else None,
                    )
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                    recal_btn = gr.Button("Recalibrate", elem_id="recalibrate")
                with gr.Accordion("Live mode (microphone)", open=False, visible=not ON_ZERO_GPU):
                    gr.Markdown(LIVE_HELP)
                    live_mic = gr.Audio(
                        label="Live microphone",
                        sources=["microphone"],
                        streaming=True,
                        type="filepath",
                        elem_id="live_mic",
                    )
                rows = _example_rows()
                if rows:
                    gr.Examples(
                        rows, inputs=[portrait, audio, text], label="Offline example", cache_examples=False
                    )
            with gr.Column(scale=2):
                with gr.Row():
                    player_a = gr.Video(
                        label="Video",
                        streaming=media.can_stream,
                        autoplay=True,
                        interactive=False,
                        elem_id="player_a",
                    )
                    player_b = gr.Video(
                        label="ISPA",
                        streaming=media.can_stream,
                        autoplay=True,
                        interactive=False,
                        height=PLAYER_HEIGHT,
                        visible=False,
                        elem_id="player_b",
                    )
                status = gr.Markdown(label="Status", elem_id="status")
                downloads = gr.File(
                    label="Downloads: video(s) and report", file_count="multiple", interactive=False
                )
                with gr.Accordion("Engine report (JSON)", open=False):
                    report = gr.JSON(label="Report")
            with gr.Column(scale=1):
                kv_plot = gr.LinePlot(
                    x="t_seconds",
                    y="GB",
                    color="series",
                    x_title="video time (s)",
                    y_title="KV cache (GB)",
                    label="KV-cache memory",
                    elem_id="kv_plot",
                )
                layer_map = gr.HTML(label="Layers", elem_id="layer_map")
                run_summary = gr.HTML(label="Memory and timings", elem_id="run_summary")
                drift_table = gr.HTML(label="Drift Full vs ISPA", visible=False, elem_id="drift")

        outputs = [player_a, player_b, kv_plot, layer_map, run_summary, drift_table, status]
        outputs += [downloads, report]
        settings = [policy, k_fraction, t_warm, seed, model, lam, size]
        gen_event = generate_btn.click(
            generate,
            inputs=[portrait, audio, text, prompt, *settings],
            outputs=outputs,
            api_name="generate",
            concurrency_limit=1,
            concurrency_id="gpu",
            show_progress_on=[status],
        )
        live_event = live_mic.start_recording(
            open_live_feed, None, None, queue=False, api_visibility="private"
        ).then(
            generate_live,
            inputs=[portrait, prompt, *settings],
            outputs=outputs,
            concurrency_limit=1,
            concurrency_id="gpu",
            show_progress_on=[status],
            api_visibility="private",
        )
        live_mic.stream(
            push_live_audio,
            inputs=[live_mic],
            outputs=None,
            stream_every=MIC_STREAM_EVERY_SECONDS,
            time_limit=MAX_AUDIO_SECONDS + 5,
            concurrency_limit=MIC_SESSIONS,
            concurrency_id="mic",
            api_visibility="private",
        )
        live_mic.stop_recording(close_live_feed, None, None, queue=False, api_visibility="private")
        stop_btn.click(
            stop_run,
            None,
            [downloads, report],
            cancels=[gen_event, live_event],
            api_name="stop",
            concurrency_limit=None,
        )
        recal_btn.click(recalibrate, None, None, api_name="recalibrate", concurrency_limit=None)
        policy.change(
            show_mode, [policy], [player_a, player_b, drift_table], queue=False, api_visibility="private"
        )
        model.change(refresh_sizes, [model], [size], api_visibility="private", concurrency_limit=None)
        demo.load(refresh_sizes, [model], [size], api_visibility="private", concurrency_limit=None)
        demo.unload(end_session)
    return demo


def serve(demo: gr.Blocks, **launch_kwargs: Any) -> tuple:
    """Queue and launch: one generation at a time on the GPU, a bounded queue and uploads, no tracebacks."""
    removed = remove_stale_run_dirs(STALE_RUN_DIR_SECONDS)
    if removed:
        logger.info("removed %d stale run folders", removed)
    if not ffmpeg_status().can_stream:
        logger.warning(ffmpeg_status().message)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    options: dict[str, Any] = {
        "max_file_size": MAX_FILE_SIZE,
        "show_error": False,
        "theme": gr.themes.Default(),
        "css": CSS,
    }
    return demo.launch(**(options | launch_kwargs))
