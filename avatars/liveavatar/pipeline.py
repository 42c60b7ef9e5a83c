"""LiveAvatar streaming generation on one process: a portrait and speech in, one chunk of video per 12-frame block
out (`AvatarBackend`).

A run is the block loop (`avatars.liveavatar.streaming.block_loop`) with one stage owning all the denoising steps
and the decode here (`LocalDownstream`). With `refresh_sink`, the sink is prefilled again before block 4 with
block 0's first latent frame as reference.

Nothing grows with video length: chunks are handed out, the audio buffers of live input keep only what is
still needed (audio known in full gets its features in one pass, as the official pipeline computes them),
RoPE angles come from positions (no table to run off), and the KV history is the session's bounded rings.
Each `stream()` call owns its session, decoder cache and random generators, so two runs (Full and ISPA with
the same seed) can share one loaded model and be advanced alternately, block by block.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import numpy as np
import torch

from avatars.base import AvatarChunk, GenerationRequest, RunControl
from avatars.liveavatar.block_layout import FPS
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.encoders.audio import SAMPLE_RATE, AudioEncoder
from avatars.liveavatar.encoders.text import TextEncoder
from avatars.liveavatar.encoders.vae import WanVAE
from avatars.liveavatar.memory_plan import plan_roles
from avatars.liveavatar.portrait_latents import PortraitLatentCache, PortraitLatents
from avatars.liveavatar.rank_layout import RankLayout
from avatars.liveavatar.schedule import DenoisingSchedule, check_steps
from avatars.liveavatar.sizing import SizeChoice, choose_size, fit_portrait, planned_size
from avatars.liveavatar.streaming.audio_timeline import AudioTimeline
from avatars.liveavatar.streaming.block_loop import BlockNoise, stream_blocks
from avatars.liveavatar.streaming.decoding import DEFAULT_DECODER_WARMUP, DecoderStage
from avatars.liveavatar.streaming.local import LocalDownstream
from avatars.liveavatar.streaming.messages import RunSpec
from avatars.liveavatar.streaming.stage import DenoisingStage
from avatars.media.portrait import check_rgb_image
from avatars.memory import MemoryPlan
from ispa import Policy
from ispa.checks import check_positive_int, is_int
from ispa.quantized_cache import kv_layer_factory

logger = logging.getLogger(__name__)


class LiveAvatarPipeline:
    """The DiT and its three encoders, loaded once; `stream()` runs one generation."""

    def __init__(
        self,
        dit: LiveAvatarDiT,
        audio_encoder: AudioEncoder,
        text_encoder: TextEncoder,
        vae: WanVAE,
        *,
        label: str,
        is_test_model: bool,
        size_divisor: int,
        sizes: tuple[SizeChoice, ...],
        model: str,
        weights: str = "bf16",
    ) -> None:
        if not sizes:
            raise ValueError("a pipeline needs at least one size choice")
        self.dit = dit
        self.audio_encoder = audio_encoder
        self.text_encoder = text_encoder
        self.vae = vae
        self.label = label
        self.is_test_model = is_test_model
        self.size_divisor = size_divisor
        self.sizes = sizes
        self.model = model  # the DiT's preset (`avatars.liveavatar.config.PRESETS`), for the memory plan
        self.weights = weights  # how the DiT's linear layers are stored: "bf16" or "fp8"
        self.sample_rate = SAMPLE_RATE
        self.fps = FPS
        self.portrait_latents = PortraitLatentCache(vae)
        # Decode block k while the DiT runs block k+1 (`LocalDownstream`); None: on CUDA only (on a CPU both would
        # share the same cores). Chunks are the same either way.
        self.overlap_decode: bool | None = None
        # How the warmup statistics' GEMMs run (`ispa.statistics_precision`): None is the device's default; "bf16"
        # is issue 20's opt-in lever. Every stage of a run gets it with the run's spec.
        self.statistics_precision: str | None = None
        self.fused_merge = (
            False  # the LSE merge as one compiled function (`ispa.fused_merge`), issue 20's lever
        )
        # Which motion latents warm the decoder (`streaming.decoding.DECODER_WARMUPS`); the same for every run, so
        # compare mode's runs can share one warm-up.
        self.decoder_warmup = DEFAULT_DECODER_WARMUP
        self._run_numbers = itertools.count()

    @property
    def device(self) -> torch.device:
        return self.dit.device

    def size_choices(self) -> list[tuple[str, int]]:
        """(label, max pixel area) for a size dropdown; the first is the default."""
        return [(s.label, s.max_area) for s in self.sizes]

    def output_size(self, portrait: np.ndarray, max_area: int | None = None) -> tuple[int, int]:
        """(height, width) of the video made from this portrait under `max_area` (default: the first choice)."""
        area = self.sizes[0].max_area if max_area is None else max_area
        check_positive_int(area, "max_area (pixels)")
        return choose_size(portrait.shape[0], portrait.shape[1], area, self.size_divisor)

    def planned_size(self, max_area: int) -> tuple[int, int]:
        """(height, width) a size choice is planned at before any portrait is seen (a 16:9 portrait's size)."""
        return planned_size(max_area, self.size_divisor)

    def memory_plans(
        self, height: int, width: int, policy: Policy, kv_format: str, layout: RankLayout | None = None
    ) -> list[MemoryPlan]:
        """The memory plan of a run at `height`×`width` with these settings: one GPU's, or with `layout` one per
        role of the pipeline's ranks."""
        plans = plan_roles(
            height,
            width,
            model=self.model,
            weights=self.weights,
            kv_format=kv_format,
            policy=policy,
            layout=layout,
        )
        return list(plans.values())

    def close(self) -> None:
        """Nothing to tell anyone: the models go with the object."""

    # ---- one run -------------------------------------------------------------------------------------------
    def stream(self, request: GenerationRequest, control: RunControl | None = None) -> Iterator[AvatarChunk]:
        """Generate chunk by chunk. Bad input raises ValueError before anything runs.

        Closing the generator (or `control.cancel()`, honoured between blocks) ends the run and frees what it
        held on the device. `request.refresh_sink`: at the start of clip 1 (block 4), prefill the sink again with
        the first generated latent frame as its reference, as the official 5-GPU pipeline does (and the
        single-GPU one with `--enable_online_decode`); off by default, as in the official single-GPU scripts.
        A run on a portrait an earlier run used starts from that run's warmed decoder (`portrait_latents`); the
        frames are the same as without it.
        """
        height, width = self.check_run(request)
        return self._run(request, height, width, control or RunControl())

    def check_run(self, request: GenerationRequest) -> tuple[int, int]:
        """`stream()`'s input checks: (height, width) of the run's video, or ValueError naming the field."""
        portrait = _check_portrait(request.portrait)
        check_positive_int(request.sample_rate, "sample_rate")
        if not is_int(request.seed) or request.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {request.seed!r}")
        if not isinstance(request.policy, Policy):
            raise ValueError(
                f"policy must be an ispa Policy (one of ispa.POLICIES, e.g. ISPAPolicy()), got {request.policy!r}"
            )
        kv_layer_factory(request.kv_format)  # `kv_format`: one of ispa.quantized_cache.KV_FORMATS
        if not isinstance(request.refresh_sink, bool):
            raise ValueError(f"refresh_sink must be True or False, got {request.refresh_sink!r}")
        check_steps(request.steps)
        return self.output_size(portrait, request.max_area)

    def run_spec(
        self, request: GenerationRequest, height: int, width: int
    ) -> tuple[RunSpec, PortraitLatents]:
        """What every stage of the run needs (the prompt's text context, the portrait's latents), computed once,
        and the portrait's latents (the key of what runs on the same portrait may share)."""
        fitted = fit_portrait(request.portrait, height, width)
        context = self.dit.embed_text(self.text_encoder.encode(request.prompt)[None].to(self.device))
        latents = self.portrait_latents.get(fitted)
        spec = RunSpec(
            next(self._run_numbers),
            request.policy,
            request.kv_format,
            request.refresh_sink,
            request.seed,
            context.states,
            latents.reference,
            latents.motion,
            height // 8,
            width // 8,
            request.steps,
            self.statistics_precision,
            self.fused_merge,
        )
        return spec, latents

    def _run(
        self, request: GenerationRequest, height: int, width: int, control: RunControl
    ) -> Iterator[AvatarChunk]:
        audio = AudioTimeline(request.audio, request.sample_rate, self.audio_encoder)
        spec, portrait = self.run_spec(request, height, width)
        stage = DenoisingStage(self.dit, DenoisingSchedule.liveavatar(spec.steps), spec)
        try:
            warm = self.portrait_latents.warmed_decoder(portrait, self.decoder_warmup, self.vae.device)
            decoder = DecoderStage(self.vae, spec.motion_latents, warm, self.decoder_warmup)
            if warm is None:
                host_copy = decoder.snapshot(torch.device("cpu"))
                self.portrait_latents.keep_warmed_decoder(portrait, self.decoder_warmup, host_copy)
            downstream = LocalDownstream(decoder, self.overlap_decode, live=audio.live)
        except BaseException:
            stage.close()
            raise
        noise = BlockNoise(self.dit, spec.seed, spec.latent_h, spec.latent_w)
        del spec
        try:
            yield from stream_blocks(stage, downstream, audio, noise, control)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def _check_portrait(image: np.ndarray) -> np.ndarray:
    check_rgb_image(image)
    if min(image.shape[:2]) < 16:
        raise ValueError(f"portrait is too small ({image.shape[1]}×{image.shape[0]} pixels)")
    return image
