"""The Gradio app: a portrait and speech in, a talking-head video streamed out while it is generated, with the
ISPA engine's KV-cache memory, layer map and timings beside it.

Order, as in Gradio's own demos: handlers (module-level functions), then `build_demo` (the columns come from
`app.layout`) and the events, then `serve`. The generation itself is `app.generation.run_generation`, which
yields `app.layout.RunOutputs` records; per-owner server state (run controls, live microphone audio, run
folders) lives in `app.sessions.SESSIONS`, keyed by the run's owner token (a hidden input the page gets at load;
never Gradio's session hash, which appears in URLs). `app.request_guard` sits in front of Gradio's routes with
the upload budgets of `app.upload_budget`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from html import escape
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from app.examples import bundled_example
from app.generation import check_gpu_time, run_generation
from app.gpu import ON_ZERO_GPU
from app.gpu_sizes import check_run_fits, settings_that_fit
from app.inputs import COMPARE, DEFAULT_COMPARE, DEFAULT_SIZE, EngineChoices, RunSpec, prepare_run
from app.layout import PLAYER_HEIGHT, InputControls, RunOutputs, input_column, output_columns
from app.live_audio import decode_mic_piece
from app.media import ffmpeg_status, remove_stale_run_dirs, temp_root
from app.missing_inputs import name_missing_inputs
from app.models import (
    REAL_MODEL,
    check_model,
    default_model,
    get_pipeline,
    hide_paths,
    model_availability,
    pipeline_pool,
    preload_for_zero_gpu,
    usable_sizes,
)
from app.raw_numbers import pass_raw
from app.request_guard import HEARTBEATS, RequestGuard, behind_space_proxy
from app.run_view import recalibrate_state
from app.sessions import SESSIONS, ActiveRun, start_sweeper
from app.stream_end import RELOAD_ENDED_STREAMS_JS
from app.tts import TextToSpeechError
from app.upload_budget import MAX_FILE_MB, TempUsage, UploadLimits, disk_refusal
from app.validation import MAX_AUDIO_SECONDS, ValidationError
from app.weights_on_start import current_download, download_running
from avatars.base import BackendFailure
from ispa import ISPAPolicy

logger = logging.getLogger(__name__)

QUEUE_SIZE = 16
MAX_FILE_SIZE = f"{MAX_FILE_MB}mb"  # per file (Gradio's check); per request and per client: app.upload_budget
# What a run may write (segments, mp4s, report): the temp budget must leave this much before a run starts.
RUN_DISK_RESERVE_BYTES = 64 * 1024 * 1024
STALE_RUN_DIR_SECONDS = 3600
STOP_WAIT_SECONDS = 30.0
MIC_STREAM_EVERY_SECONDS = 0.25
WEIGHTS_NEWS_EVERY_SECONDS = 2.0  # how often the banner shows a background download's progress
MIC_SESSIONS = 8
# A streamed video sizes itself to the column's width; a tall portrait video would push everything down.
CSS = (
    f"#player_a video, #player_b video {{ max-height: {PLAYER_HEIGHT}px; object-fit: contain; }}"
    " .run-summary table { width: 100%; }"  # its headers and values wrap (app.panels): it fits 1280 px
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
    except BackendFailure:  # e.g. a rank of a pipeline: the message names ranks and sockets, for the log only
        logger.exception("the model's backend failed")
        raise gr.Error(
            "This server's model stopped working (for example a process of its multi-GPU pipeline), so no run "
            "can go on; the server must be restarted (details are in the server log)."
        ) from None
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
    lam: float = ISPAPolicy.lam,
    size: str = DEFAULT_SIZE,
    kv_format: str = "bf16",
    refresh_sink: bool = False,
    owner_token: str | None = None,
    compare_a: str = DEFAULT_COMPARE[0],
    compare_b: str = DEFAULT_COMPARE[1],
    steps: int = 4,
    request: gr.Request = None,
) -> Iterator[tuple]:
    """Generate from a portrait and speech (an audio file, or text spoken offline), streaming the video. Only a
    request with the same `owner_token` can stop or recalibrate the run (none: nobody can)."""
    choices = EngineChoices(
        policy=policy,
        k_fraction=k_fraction,
        t_warm=t_warm,
        lam=lam,
        seed=seed,
        size=size,
        model=model,
        kv_format=kv_format,
        refresh_sink=refresh_sink,
        steps=steps,
        compare_a=compare_a,
        compare_b=compare_b,
    )
    yield from _generate(
        request, choices, owner_token, portrait=portrait, prompt=prompt, audio=audio, text=text
    )


def generate_live(
    portrait: str | None,
    prompt: str | None,
    policy: str,
    k_fraction: float,
    t_warm: float,
    seed: float,
    model: str,
    lam: float = ISPAPolicy.lam,
    size: str = DEFAULT_SIZE,
    kv_format: str = "bf16",
    refresh_sink: bool = False,
    owner_token: str | None = None,
    compare_a: str = DEFAULT_COMPARE[0],
    compare_b: str = DEFAULT_COMPARE[1],
    steps: int = 4,
    request: gr.Request = None,
) -> Iterator[tuple]:
    """Live mode: generate while the microphone streams into this owner's feed."""
    choices = EngineChoices(
        policy=policy,
        k_fraction=k_fraction,
        t_warm=t_warm,
        lam=lam,
        seed=seed,
        size=size,
        model=model,
        kv_format=kv_format,
        refresh_sink=refresh_sink,
        steps=steps,
        compare_a=compare_a,
        compare_b=compare_b,
    )
    yield from _generate(request, choices, owner_token, portrait=portrait, prompt=prompt, live=True)


def _generate(
    request: gr.Request | None,
    choices: EngineChoices,
    owner_token: str | None,
    *,
    portrait: str | None,
    prompt: str | None,
    audio: str | None = None,
    text: str | None = None,
    live: bool = False,
) -> Iterator[tuple]:
    """Check the inputs, then stream the run's outputs as the tuple Gradio expects (`RunOutputs` order)."""
    page = _session(request)
    with user_errors():
        session = _live_owner(owner_token, page) if live else SESSIONS.owner(owner_token)
        full = disk_refusal(temp_root(), RUN_DISK_RESERVE_BYTES, UPLOAD_LIMITS, used=TEMP_USAGE.used())
        if full is not None:
            raise ValidationError(full)
        try:
            spec = _prepare(choices, portrait=portrait, prompt=prompt, audio=audio, text=text, live=live)
        except Exception:
            feed = SESSIONS.feed(session) if live else None
            if feed is not None:
                feed.close()  # the microphone's recording cannot be used: let it end
            raise
        for outputs in run_generation(spec, choices.model, session, live=live):
            yield tuple(outputs.as_list())


def _prepare(
    choices: EngineChoices,
    *,
    portrait: str | None,
    prompt: str | None,
    audio: str | None,
    text: str | None,
    live: bool,
) -> RunSpec:
    pipe = get_pipeline(check_model(choices.model))
    sizes, too_big = usable_sizes(pipe)
    if not sizes:
        raise ValidationError("No size of this model fits this GPU: " + "; ".join(too_big))
    spec = prepare_run(
        portrait=portrait,
        audio=audio,
        text=text,
        prompt=prompt,
        policy=choices.policy,
        k_fraction=choices.k_fraction,
        t_warm=choices.t_warm,
        lam=choices.lam,
        seed=choices.seed,
        size=choices.size,
        kv_format=choices.kv_format,
        refresh_sink=choices.refresh_sink,
        steps=choices.steps,
        compare_a=choices.compare_a,
        compare_b=choices.compare_b,
        size_choices=sizes,
        sample_rate=pipe.sample_rate,
        speech_dir=temp_root(),
        live=live,
    )
    check_run_fits(spec, pipe)
    check_gpu_time(spec, pipe)
    for note in spec.warnings:
        gr.Warning(_as_text(note))
    return spec


# ------------------------------------------------------------------------------------- run and live controls
def _owner(token: str | None, action: str) -> str | None:
    """The owner a control request names; None (with a warning) when it names none."""
    if token is None or token == "":
        gr.Warning(f"{action} needs the run's owner token (the one the run was started with).")
        return None
    with user_errors():
        return SESSIONS.owner(token)


def stop_run(owner_token: str | None = None, request: gr.Request = None) -> tuple:
    """Stop this owner's run between chunks and hand over its files (what exists so far)."""
    _session(request)
    session = _owner(owner_token, "Stop")
    if session is None:
        return gr.skip(), gr.skip()
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


def recalibrate(owner_token: str | None = None, request: gr.Request = None) -> None:
    """Ask the running ISPA run to warm up again and re-absorb (e.g. after the scene changed)."""
    _session(request)
    session = _owner(owner_token, "Recalibrate")
    if session is None:
        return
    run: ActiveRun | None = SESSIONS.run(session)
    if run is not None and run.recalibrate():
        gr.Info("Recalibration requested: the ISPA run warms up again from its next block.")
    else:
        gr.Warning("No ISPA run is running, so there is nothing to recalibrate.")


def show_recalibrate(owner_token: str | None = None, request: gr.Request = None) -> tuple:
    """Recalibrate on while this owner's ISPA run streams, off otherwise, with the line saying why. Called
    when the status line changes (a run's first chunk, its end) and after every generation event."""
    run: ActiveRun | None = None
    if isinstance(owner_token, str) and owner_token:
        with contextlib.suppress(ValidationError):
            run = SESSIONS.run(SESSIONS.owner(owner_token))
    running = run is not None and not run.finished.is_set()
    enabled, why = recalibrate_state(running, len(run.recalibrable) if running else 0, ON_ZERO_GPU)
    return gr.Button(interactive=enabled), why


def issue_owner_token(request: gr.Request = None) -> str:
    """The page's owner token, sent in this (non-queued) response's body only."""
    return SESSIONS.issue_token(_session(request))


LIVE_TOKEN_REFUSAL = (
    "Live mode works only from the page that was given this owner token; please reload the page (its token "
    "may also have expired after an hour unused)."
)


def _live_owner(token: str | None, page: str) -> str:
    """Live mode's events act only with the owner token issued to the page that sends them, so a made-up
    token (an API client's, or a stranger's) opens no feed and starts no live run."""
    owner = SESSIONS.live_owner(token, page)
    if owner is None:
        raise ValidationError(LIVE_TOKEN_REFUSAL)
    return owner


def open_live_feed(owner_token: str | None = None, request: gr.Request = None) -> None:
    owner = SESSIONS.live_owner(owner_token, _session(request))
    if owner is None:
        gr.Warning(LIVE_TOKEN_REFUSAL)
        return
    SESSIONS.open_feed(owner)


def push_live_audio(
    piece: str | tuple | None, owner_token: str | None = None, request: gr.Request = None
) -> None:
    """One microphone piece from the `.stream()` event into this owner's feed."""
    owner = SESSIONS.live_owner(owner_token, _session(request))
    feed = SESSIONS.feed(owner) if owner is not None else None
    if piece is None or feed is None or feed.closed:
        return
    with user_errors():
        rate, samples = decode_mic_piece(piece)
        feed.push(rate, samples)


def close_live_feed(owner_token: str | None = None, request: gr.Request = None) -> None:
    owner = SESSIONS.live_owner(owner_token, _session(request))
    feed = SESSIONS.feed(owner) if owner is not None else None
    if feed is not None:
        feed.close()


def end_session(request: gr.Request = None) -> None:
    """A heartbeat of this session hash ended: when none is left (the tab closed), stop the runs of the tokens
    issued to it and delete their files. Anyone may open and drop a heartbeat for a session hash they saw in a
    URL, so while the page's own heartbeat is still open nothing happens."""
    if request is None or not request.session_hash:
        return
    if HEARTBEATS.count(request.session_hash) > 0:
        return
    SESSIONS.end_page(request.session_hash)


# -------------------------------------------------------------------------------------------- small updates
def show_mode(policy: str, compare_a: str = DEFAULT_COMPARE[0], compare_b: str = DEFAULT_COMPARE[1]) -> tuple:
    """Compare mode shows its A and B choices, a second player and the drift table; the players are named after
    the runs they show."""
    compare = policy == COMPARE
    return (
        gr.Dropdown(visible=compare),
        gr.Dropdown(visible=compare),
        gr.Video(label=str(compare_a) if compare else "Video"),
        gr.Video(visible=compare, label=str(compare_b)),
        gr.HTML(visible=compare),
    )


def name_players(policy: str, compare_a: str, compare_b: str) -> tuple:
    """In compare mode the players carry the names of the runs they show."""
    return show_mode(policy, compare_a, compare_b)[2:4]


def refresh_sizes(model: str) -> Any:
    """The size choices of the chosen model (loading it on first use)."""
    try:
        pipe = get_pipeline(check_model(model))
    except ValidationError:
        return gr.skip()
    sizes, too_big = usable_sizes(pipe)
    notes = []
    fitting = settings_that_fit(pipe)
    if fitting:
        notes.append("KV formats that fit this GPU, by the memory plan: " + "; ".join(fitting))
    if too_big:
        notes.append("Left out, by the memory plan: " + "; ".join(too_big))
    note = ". ".join(notes) or None
    return gr.Dropdown(choices=[DEFAULT_SIZE, *(label for label, _ in sizes)], value=DEFAULT_SIZE, info=note)


# ---------------------------------------------------------------------------------------------------- layout
INTRO = (
    "# ispa-avatar\n"
    "A portrait plus speech becomes a talking-head video that streams while it is generated "
    "(LiveAvatar under the ISPA KV-cache engine)."
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
    """The whole UI; builds no model (the first run, or the first page load, loads it), except on ZeroGPU,
    where the real model must be loaded before the app launches."""
    preload_for_zero_gpu()
    availability = model_availability()
    media = ffmpeg_status()
    with gr.Blocks(title="ispa-avatar", delete_cache=(STALE_RUN_DIR_SECONDS, STALE_RUN_DIR_SECONDS)) as demo:
        gr.Markdown(INTRO)
        banner = banner_markdown(availability, media.can_stream, media.message)
        banner_box = gr.Markdown(banner, visible=bool(banner), elem_id="banner")
        with gr.Row():
            with gr.Column(scale=4):
                controls = input_column(availability, default_model(), not ON_ZERO_GPU, _example_rows())
            outputs = output_columns(media.can_stream)
        # The settings check and the input count are answered in the app's words, not Gradio's.
        pass_raw(controls.k_fraction, controls.t_warm, controls.lam, controls.seed)
        name_missing_inputs(demo)
        _wire_events(demo, controls, outputs)
        if current_download() is not None:
            timer = gr.Timer(WEIGHTS_NEWS_EVERY_SECONDS, active=download_running())
            timer.tick(
                weights_news, None, [banner_box, controls.model, timer], api_visibility="private", queue=False
            )
    return demo


def weights_news() -> tuple[Any, Any, Any]:
    """The banner and the model choice as a background download of the 14B weights goes on (the 14B model
    selectable once they are complete and checked), and whether to ask again."""
    availability = model_availability()
    media = ffmpeg_status()
    banner = banner_markdown(availability, media.can_stream, media.message)
    reason = availability.get(REAL_MODEL)
    return (
        gr.Markdown(banner, visible=bool(banner)),
        gr.Radio(interactive=reason is None, info=f"14B unavailable: {reason}" if reason else None),
        gr.Timer(active=download_running()),
    )


def _wire_events(demo: gr.Blocks, controls: InputControls, outputs: RunOutputs[Any]) -> None:
    """Every event of the page: generation (button and live microphone), the run controls, small updates."""
    run_outputs = outputs.as_list()
    # One generation per pipeline of the pool (one per GPU); the rest wait in Gradio's queue, told their place.
    gpu_slots = pipeline_pool().size
    generation = controls.generate.click(
        generate,
        inputs=controls.inputs_for(generate),
        outputs=run_outputs,
        api_name="generate",
        concurrency_limit=gpu_slots,
        concurrency_id="gpu",
        show_progress_on=[outputs.status],
    )
    live_mic = controls.live_mic
    token = [controls.owner_token]
    live_generation = live_mic.start_recording(
        open_live_feed, token, None, queue=False, api_visibility="private"
    ).then(
        generate_live,
        inputs=controls.inputs_for(generate_live),
        outputs=run_outputs,
        concurrency_limit=gpu_slots,
        concurrency_id="gpu",
        show_progress_on=[outputs.status],
        api_visibility="private",
    )
    live_mic.stream(
        push_live_audio,
        inputs=[live_mic, controls.owner_token],
        outputs=None,
        stream_every=MIC_STREAM_EVERY_SECONDS,
        time_limit=MAX_AUDIO_SECONDS + 5,
        concurrency_limit=MIC_SESSIONS,
        concurrency_id="mic",
        api_visibility="private",
    )
    # A run's streams end when its generator returns; the players are told at once (see app.stream_end).
    players = [outputs.player_a, outputs.player_b]
    for ended in (generation.then, live_generation.then):
        ended(None, players, players, js=RELOAD_ENDED_STREAMS_JS, queue=False, api_visibility="private")
    live_mic.stop_recording(close_live_feed, token, None, queue=False, api_visibility="private")
    # No `cancels=`: Gradio's cancel acts on a session hash anyone can name; Stop ends the run between chunks.
    controls.stop.click(
        stop_run, token, [outputs.downloads, outputs.report], api_name="stop", concurrency_limit=None
    )
    controls.recalibrate.click(recalibrate, token, None, api_name="recalibrate", concurrency_limit=None)
    # Recalibrate follows the run: on at its first chunk, off at its end, also when it fails or is refused.
    recalibrate_outputs = [controls.recalibrate, controls.recalibrate_note]
    for trigger in (outputs.status.change, generation.then, live_generation.then):
        trigger(
            show_recalibrate,
            token,
            recalibrate_outputs,
            queue=False,
            show_progress="hidden",
            api_visibility="private",
        )
    compare_choices = [controls.policy, controls.compare_a, controls.compare_b]
    controls.policy.change(
        show_mode,
        compare_choices,
        [controls.compare_a, controls.compare_b, outputs.player_a, outputs.player_b, outputs.drift_table],
        queue=False,
        api_visibility="private",
    )
    for choice in (controls.compare_a, controls.compare_b):  # they do not update themselves: no change loop
        choice.change(
            name_players,
            compare_choices,
            [outputs.player_a, outputs.player_b],
            queue=False,
            api_visibility="private",
        )
    controls.model.change(
        refresh_sizes, [controls.model], [controls.size], api_visibility="private", concurrency_limit=None
    )
    demo.load(
        refresh_sizes, [controls.model], [controls.size], api_visibility="private", concurrency_limit=None
    )
    demo.load(issue_owner_token, None, token, queue=False, api_visibility="private")
    demo.unload(end_session)


GENERATION_HANDLERS = (generate, generate_live)


def generation_event_ids(demo: gr.Blocks) -> set[int]:
    """The ids of `demo`'s generation events (Gradio's cancel must not reach them), read from its own event
    table: nothing is stored on the Gradio object."""
    return {fn_id for fn_id, block_fn in demo.fns.items() if block_fn.fn in GENERATION_HANDLERS}


def hidden_events(demo: gr.Blocks) -> tuple[set[int], set[str]]:
    """The ids and api names of `demo`'s events that are not part of its API (`api_visibility="private"`):
    the page's own, refused to clients that never loaded the page."""
    private = {fn_id: fn.api_name for fn_id, fn in demo.fns.items() if fn.api_visibility == "private"}
    return set(private), {name for name in private.values() if name}


UPLOAD_LIMITS = UploadLimits.from_environment()
TEMP_USAGE = TempUsage(temp_root)  # the temp folder's size for the upload budget and Generate
_sweeper: list[threading.Event] = []


def request_guard(demo: gr.Blocks, limits: UploadLimits | None = None) -> Middleware:
    """The middleware of `app.request_guard` for this app: its budgets (`UPLOAD_LIMITS` unless given), its temp
    folder, its generation events."""
    limits = limits or UPLOAD_LIMITS
    return Middleware(
        RequestGuard,
        limits=limits,
        budget=limits.client_budget(),
        temp_root=temp_root,
        protected_fns=lambda: generation_event_ids(demo),
        private_events=lambda: hidden_events(demo),
        usage=TEMP_USAGE,
        trust_forwarded=behind_space_proxy(),
    )


def serve(demo: gr.Blocks, **launch_kwargs: Any) -> tuple:
    """Queue and launch: one generation at a time per pooled GPU, a bounded queue, upload budgets, run folders
    swept in the background, no tracebacks."""
    if not _sweeper:
        _sweeper.append(start_sweeper(SESSIONS))
    removed = remove_stale_run_dirs(STALE_RUN_DIR_SECONDS)
    if removed:
        logger.info("removed %d stale run folders", removed)
    TEMP_USAGE.refresh()  # the one walk of the temp folder that is not on a background thread
    if not ffmpeg_status().can_stream:
        logger.warning(ffmpeg_status().message)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    options: dict[str, Any] = {
        "max_file_size": MAX_FILE_SIZE,
        "show_error": False,
        "theme": gr.themes.Default(),
        "css": CSS,
        "app_kwargs": {"middleware": [request_guard(demo)]},
        # The page must come from this server (not Gradio's Node renderer), so the guard sees its load and sets
        # the client cookie that session hashes are bound to (app.client_binding).
        "ssr_mode": False,
    }
    return demo.launch(**(options | launch_kwargs))
