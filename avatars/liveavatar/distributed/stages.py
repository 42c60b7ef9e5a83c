"""The two kinds of pipeline stage: a DiT rank (its steps of every block, its rings) and the decoder.

Every DiT rank replays the run's `random.Random(seed)` and draws all four `ref_shift`s of each block, using its
own steps' ones, so each forward gets the offset it gets in one process; the sink is prefilled on every DiT rank
from the same inputs, so each holds the same sink. A rank sends a block on before closing it (`end_block`), so
the next rank can start at once; the statistics all-reduce at an absorb is the one point where the DiT ranks wait
for each other (the pipeline drains once per absorb).
"""

from __future__ import annotations

import random
import time

import torch

from avatars.liveavatar.block_layout import (
    BLOCKS_PER_CLIP,
    DENOISING_STEPS,
    LATENT_FRAMES_PER_BLOCK,
    cache_layout,
)
from avatars.liveavatar.distributed.channel import Tag
from avatars.liveavatar.distributed.messages import BlockWork, DecodedBlock, Reference, RunSpec, StageReport
from avatars.liveavatar.distributed.stage_models import StageModels
from avatars.liveavatar.distributed.world import PipelineWorld
from avatars.liveavatar.dit.audio_encoder import AudioTokens
from avatars.liveavatar.dit.text_context import TextContext
from avatars.liveavatar.encoders.vae import MOTION_LATENT_FRAMES
from avatars.liveavatar.pipeline import REF_SHIFT_RANGE, _synchronize, _to_uint8_frames
from avatars.liveavatar.schedule import euler_step
from ispa import AttentionSession
from ispa.quantized_cache import kv_layer_factory

__all__ = ["DecoderStage", "DiTStage"]


class DiTStage:
    """DiT rank `world.rank` of one run: its session (sink + its steps' rings) and its share of every block."""

    def __init__(self, models: StageModels, world: PipelineWorld, spec: RunSpec) -> None:
        if models.dit is None:
            raise ValueError(f"rank {world.rank} holds no DiT, so it cannot run DiT steps")
        self.models = models
        self.world = world
        self.spec = spec
        self.steps = world.layout.steps(world.rank)
        dit, device = models.dit, models.device
        self.context = TextContext(spec.context_states.to(device))
        layout = cache_layout(dit.tokens_per_frame(spec.latent_h, spec.latent_w))
        reducer = world.sum_statistics if world.layout.dit_ranks > 1 else None
        self.session = AttentionSession(
            spec.policy,
            num_layers=dit.config.num_layers,
            layout=layout,
            kv_layer=kv_layer_factory(spec.kv_format),
            statistics_reducer=reducer,
        )
        motion = spec.motion_latents.to(device)
        dit.prefill_sink(self.session, spec.ref_latent.to(device), motion, self.context)
        self._motion_latents = motion if spec.refresh_sink else None
        self._reference: torch.Tensor | None = None  # block 0's first latent frame (last DiT rank)
        self._ref_shifts = random.Random(spec.seed)
        is_last = world.rank == world.layout.last_dit
        self.decoder = DecoderStage(models, spec) if is_last and world.layout.decoder_shared else None

    def process(self, work: BlockWork) -> StageReport:
        """Denoise `work` through this rank's steps, pass it on (or decode it), close the block; its report."""
        dit, device, world = self.models.dit, self.models.device, self.world
        schedule = self.models.schedule
        started = time.perf_counter()
        ref_shifts = [self._ref_shifts.randint(*REF_SHIFT_RANGE) for _ in range(DENOISING_STEPS)]
        if work.recalibrate:
            self.session.request_recalibration()
        if self._motion_latents is not None and work.block == BLOCKS_PER_CLIP:
            self._refresh_sink()
        if work.mass_sums is not None:
            self.session.continue_history_mass(_to(work.mass_sums, device), work.mass_counts)

        latents = work.latents.to(device)
        audio = AudioTokens(*(t.to(device) for t in work.audio))
        frame_index = work.block * LATENT_FRAMES_PER_BLOCK
        for step in self.steps:
            flow = dit.forward_block(
                self.session,
                latents,
                schedule.timesteps[step],
                self.context,
                audio,
                frame_index=frame_index,
                ring=step,
                ref_shift=ref_shifts[step],
            )
            latents = euler_step(latents, flow, schedule.sigmas[step], schedule.sigmas[step + 1])
        is_last = world.rank == world.layout.last_dit
        onward = world.layout.downstream(world.rank)
        if onward is not None:
            sums, counts = self.session.history_mass_sums()
            passed = BlockWork(
                self.spec.run,
                work.block,
                latents.cpu(),
                work.audio,
                work.recalibrate,
                _to(sums, "cpu"),
                counts,
            )
            world.channel.send(passed, onward, Tag.DOWN)
        engine = self.session.end_block()
        _synchronize(device)
        if self._motion_latents is not None and work.block == 0 and is_last:
            self._share_reference(latents[:, :, :1])
        report = StageReport(
            self.spec.run,
            work.block,
            engine,
            [layer.sink_nbytes() for layer in self.session.cache.layers],
            time.perf_counter() - started,
        )
        if world.rank != 0:
            world.channel.send(report, 0, Tag.REPORT)
        if self.decoder is not None:
            world.channel.send(self.decoder.decode(work.block, latents), 0, Tag.FRAMES)
        return report

    def end(self, block: int) -> None:
        """The run ends before `block`: pass the end on (to the next stage, or as the decoder's end mark)."""
        world = self.world
        onward = world.layout.downstream(world.rank)
        if onward is not None:
            world.channel.send(BlockWork(self.spec.run, block), onward, Tag.DOWN)
        else:
            world.channel.send(DecodedBlock(self.spec.run, block), 0, Tag.FRAMES)

    def close(self) -> None:
        self.session.close()

    def _share_reference(self, reference: torch.Tensor) -> None:
        self._reference = reference
        for rank in range(self.world.layout.last_dit):
            self.world.channel.send(Reference(self.spec.run, reference.cpu()), rank, Tag.REFERENCE)

    def _refresh_sink(self) -> None:
        """Prefill the sink again with block 0's first latent frame, as the one-process run does at clip 1."""
        reference = self._reference
        if reference is None:
            channel, last_dit = self.world.channel, self.world.layout.last_dit
            reference = channel.recv_run(last_dit, Tag.REFERENCE, self.spec.run).latent
        reference = reference.to(self.models.device)
        self.models.dit.prefill_sink(self.session, reference, self._motion_latents, self.context)


class DecoderStage:
    """The VAE's causal decode of one run, warmed on the motion latents exactly as the one-process run."""

    def __init__(self, models: StageModels, spec: RunSpec) -> None:
        if models.vae is None:
            raise ValueError("this rank holds no VAE, so it cannot decode")
        self.device = models.device
        self.run = spec.run
        self.decoder = models.vae.stream_decoder()
        self.decoder.decode_block(spec.motion_latents[:, :, -MOTION_LATENT_FRAMES:].to(models.device))

    def decode(self, block: int, latents: torch.Tensor) -> DecodedBlock:
        started = time.perf_counter()
        video = self.decoder.decode_block(latents.to(self.device))
        frames = _to_uint8_frames(video)
        return DecodedBlock(self.run, block, frames, time.perf_counter() - started)


def _to(tensors: list[torch.Tensor | None], device: torch.device | str) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(device) for t in tensors]
