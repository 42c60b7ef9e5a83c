"""The page's components, built column by column, and the typed record of what a generation run updates.

`RunOutputs` is the one declaration of the run's outputs: its fields, in order, are the outputs list the generation
events are wired to, and the generator yields a `RunOutputs` of values that becomes that list's tuple. Adding a
panel is one new field here (plus the component that fills it and the value that feeds it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

import gradio as gr

from app.inputs import COMPARE_CHOICES, DEFAULT_COMPARE, DEFAULT_SIZE, ISPA, POLICY_CHOICES
from app.models import MODEL_LABELS, REAL_MODEL
from app.panels import LAYER_MAP_PLACEHOLDER, SUMMARY_PLACEHOLDER
from app.portrait_input import portrait_image
from app.run_view import RECALIBRATE_IDLE
from app.validation.settings import MAX_T_WARM, MIN_WARM_BLOCKS
from avatars.liveavatar.block_layout import LATENT_FRAMES_PER_BLOCK
from ispa import KV_FORMATS, ISPAPolicy

T = TypeVar("T")

DEFAULT_SEED = 42
PLAYER_HEIGHT = 480
INPUT_HEIGHT = 220  # portrait preview: keeps Generate within the first screen at 1280×800
BUTTON_WIDTH = 90
STATUS_PLACEHOLDER = "Give a portrait and speech (or text), then press **Generate**: the video streams here."
LIVE_HELP = (
    "Press record and speak: the audio streams to the server while you talk and the video follows block "
    "by block (0.48 s of speech each). Stop recording to end the run. The status line shows the measured "
    "delay from your speech reaching the server to its video being handed to the player."
)


@dataclass
class RunOutputs(Generic[T]):
    """What a generation run updates: components in the layout (`RunOutputs[gr.Component]`), values in the
    generator (`RunOutputs[Any]`: a value, or `gr.skip()` to leave a component as it is)."""

    player_a: T
    player_b: T
    kv_plot: T
    layer_map: T
    run_summary: T
    drift_table: T
    status: T
    downloads: T
    report: T

    def as_list(self) -> list[T]:
        """The fields in declaration order: the events' outputs list, or the tuple a handler yields."""
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def position(cls, name: str) -> int:
        """Where field `name` stands in `as_list()` (for clients that read outputs by position)."""
        return [f.name for f in fields(cls)].index(name)


@dataclass
class InputControls:
    """The left column: what the user gives and sets, and the run buttons."""

    portrait: gr.Image
    audio: gr.Audio
    text: gr.Textbox
    prompt: gr.Textbox
    policy: gr.Radio
    k_fraction: gr.Slider
    t_warm: gr.Slider
    lam: gr.Number
    seed: gr.Number
    size: gr.Dropdown
    model: gr.Radio
    kv_format: gr.Dropdown
    refresh_sink: gr.Checkbox
    steps: gr.Dropdown
    compare_a: gr.Dropdown
    compare_b: gr.Dropdown
    generate: gr.Button
    stop: gr.Button
    recalibrate: gr.Button
    recalibrate_note: gr.Markdown  # whether Recalibrate can act now, and why
    live_mic: gr.Audio
    owner_token: gr.Textbox  # hidden: the page's run-owner token (`app.sessions`), never in a URL

    def inputs_for(self, handler: Callable[..., Any]) -> list[gr.components.Component]:
        """The components a handler takes, matched by parameter name (`request` is Gradio's own)."""
        names = [n for n in inspect.signature(handler).parameters if n != "request"]
        return [getattr(self, name) for name in names]


def input_column(
    models: Mapping[str, str | None], chosen_model: str, live_mode: bool, example_rows: list[list[str]]
) -> InputControls:
    """What the user gives first (portrait, speech), the policy and the run buttons within the first screen, then
    the offline example, the folded prompt and engine settings, and live mode.

    `models` maps each model name to None when it runs here, else the reason it cannot.
    """
    real_reason = models.get(REAL_MODEL)
    with gr.Row(equal_height=True):
        portrait = portrait_image(
            label="Portrait",
            sources=["upload", "webcam"],
            type="filepath",
            image_mode=None,  # the portrait reader converts modes and EXIF rotation itself
            height=INPUT_HEIGHT,
            elem_id="portrait",
        )
        audio = gr.Audio(
            label="Speech (upload or record)",
            sources=["upload", "microphone"],
            type="filepath",
            elem_id="speech",
        )
    text = gr.Textbox(label="…or text to speak (used when no audio is given)", lines=1, elem_id="tts")
    policy = gr.Radio(
        list(POLICY_CHOICES),
        value=ISPA,
        label="Policy",
        info="ISPA turns layers local after warmup; Full keeps every layer's history; Compare runs two side by side.",
        elem_id="policy",
    )
    with gr.Row():  # compare mode's "A vs B", shown by `app.main.show_mode`
        compare_a, compare_b = (
            gr.Dropdown(
                list(COMPARE_CHOICES),
                value=value,
                label=f"Compare: {side}",
                info=info,
                visible=False,
                allow_custom_value=True,  # the app's own check answers an unknown value, in its words
                elem_id=f"compare_{side.lower()}",
            )
            for side, value, info in (
                ("A", DEFAULT_COMPARE[0], "Evict, Window and Salience hold ISPA's KV bytes after warmup."),
                ("B", DEFAULT_COMPARE[1], "Each run's drift against Full is shown per chunk."),
            )
        )
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", min_width=BUTTON_WIDTH, elem_id="generate")
        stop = gr.Button("Stop", variant="stop", min_width=BUTTON_WIDTH, elem_id="stop")
        # Off until an ISPA run streams (`app.main.show_recalibrate`); the line under the buttons says why.
        recalibrate = gr.Button(
            "Recalibrate", min_width=BUTTON_WIDTH, interactive=False, elem_id="recalibrate"
        )
    recalibrate_note = gr.Markdown(RECALIBRATE_IDLE, elem_id="recalibrate_note")
    if example_rows:
        gr.Examples(
            example_rows, inputs=[portrait, audio, text], label="Offline example", cache_examples=False
        )
    with gr.Accordion("Prompt and engine settings", open=False, elem_id="settings"):
        prompt = gr.Textbox(label="Prompt (optional)", placeholder="a person talks in a warm studio")
        k_fraction = gr.Slider(
            0.05, 1.0, value=ISPAPolicy.k_fraction, step=0.05, label="k_fraction",
            info="Share of layers that become local after warmup.",
        )  # fmt: skip
        t_warm = gr.Slider(
            MIN_WARM_BLOCKS * LATENT_FRAMES_PER_BLOCK, MAX_T_WARM, value=ISPAPolicy.t_warm,
            step=LATENT_FRAMES_PER_BLOCK, label="T_warm (latent frames)",
            info="Warmup before absorbing, at least two blocks (3 latent frames = one 0.48 s block).",
        )  # fmt: skip
        lam = gr.Number(value=ISPAPolicy.lam, label="λ (ridge regulariser of the absorb)")
        seed = gr.Number(value=DEFAULT_SEED, precision=0, label="Seed")
        size = gr.Dropdown([DEFAULT_SIZE], value=DEFAULT_SIZE, label="Size", allow_custom_value=True)
        model = gr.Radio(
            [(MODEL_LABELS.get(name, name), name) for name in models],
            value=chosen_model,
            label="Model",
            interactive=real_reason is None,
            info=f"14B unavailable: {real_reason}" if real_reason else None,
        )
        kv_format = gr.Dropdown(
            list(KV_FORMATS),
            value="bf16",
            label="KV-cache format",
            allow_custom_value=True,  # so that the app's own check answers an unknown value, in its words
            info="How the history is stored: bf16 as the model computes it, fp8 (about half), int4 (about a "
            "third), each with a bf16 sink; fp8-all stores the sink in fp8 too (a little less memory, more drift); "
            "q2 stores history and sink in 2 bits (about 13 %, the most drift); +w keeps the newest frame in bf16.",
        )
        refresh_sink = gr.Checkbox(
            value=False,
            label="Refresh the sink at clip 1",
            info="Prefill the sink again with the first generated frame, as the official 5-GPU pipeline does.",
        )
        steps = gr.Dropdown(
            [("4 (official)", 4), ("3 (deviation: faster, lower quality)", 3), ("2 (deviation: fastest)", 2)],
            value=4,
            label="Denoising steps",
            allow_custom_value=True,  # so that the app's own check answers an unknown value, in its words
            info="LiveAvatar is distilled for 4 steps; 3 and 2 keep 3 or 2 of its timesteps, a deviation from "
            "the official pipeline.",
        )
    with gr.Accordion("Live mode (microphone)", open=False, visible=live_mode):
        gr.Markdown(LIVE_HELP)
        live_mic = gr.Audio(
            label="Live microphone",
            sources=["microphone"],
            streaming=True,
            type="filepath",
            elem_id="live_mic",
        )
    owner_token = gr.Textbox(visible=False, label="Owner token")
    return InputControls(
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
        model=model,
        kv_format=kv_format,
        refresh_sink=refresh_sink,
        steps=steps,
        compare_a=compare_a,
        compare_b=compare_b,
        generate=generate,
        stop=stop,
        recalibrate=recalibrate,
        recalibrate_note=recalibrate_note,
        live_mic=live_mic,
        owner_token=owner_token,
    )


def _player(label: str, elem_id: str, can_stream: bool, visible: bool) -> gr.Video:
    return gr.Video(
        label=label,
        streaming=can_stream,
        autoplay=True,
        interactive=False,
        height=PLAYER_HEIGHT,
        visible=visible,
        elem_id=elem_id,
    )


def output_columns(can_stream: bool) -> RunOutputs[Any]:
    """The players, status, downloads and report (middle), and the engine's panels (right), each saying what
    will appear there before the first run."""
    with gr.Column(scale=4):
        with gr.Row():
            player_a = _player("Video", "player_a", can_stream, visible=True)
            player_b = _player("ISPA", "player_b", can_stream, visible=False)  # compare mode's second player
        status = gr.Markdown(STATUS_PLACEHOLDER, label="Status", elem_id="status")
        downloads = gr.File(label="Downloads: video(s) and report", file_count="multiple", interactive=False)
        with gr.Accordion("Engine report (JSON)", open=False):
            report = gr.JSON(label="Report")
    with gr.Column(scale=3):
        kv_plot = gr.LinePlot(
            x="t_seconds",
            y="kv_cache",
            color="series",
            x_title="video time (s)",
            y_title="KV cache",
            color_title="",  # no "series" title: the legend's one row under the plot is narrow
            label="KV-cache memory",
            caption="The KV cache this run holds, chunk by chunk, against a Full run's; the absorb is marked.",
            elem_id="kv_plot",
        )
        layer_map = gr.HTML(LAYER_MAP_PLACEHOLDER, label="Layers", elem_id="layer_map")
        run_summary = gr.HTML(SUMMARY_PLACEHOLDER, label="Memory and timings", elem_id="run_summary")
        drift_table = gr.HTML(label="Drift against Full", visible=False, elem_id="drift")
    return RunOutputs(
        player_a=player_a,
        player_b=player_b,
        kv_plot=kv_plot,
        layer_map=layer_map,
        run_summary=run_summary,
        drift_table=drift_table,
        status=status,
        downloads=downloads,
        report=report,
    )
