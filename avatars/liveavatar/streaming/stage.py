"""The denoising steps one process owns, for every block of one run.

A stage holds the run's session (the sink, replicated on every stage, and the history rings of its own steps).
Every stage replays the run's `random.Random(seed)` and draws all the `ref_shift`s of each block (one per step of
the schedule), using its own steps' ones, so each forward gets the offset it gets when one process runs them all.
With the sink refresh, the stage of the last step keeps block 0's first denoised latent frame and shares it with
the others (`ReferenceExchange`); at clip 1 every stage prefills its sink again from it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from avatars.liveavatar.block_layout import (
    BLOCKS_PER_CLIP,
    LATENT_FRAMES_PER_BLOCK,
    cache_layout,
)
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.dit.text_context import TextContext
from avatars.liveavatar.schedule import DenoisingSchedule, euler_step
from avatars.liveavatar.streaming.messages import BlockWork, RunSpec, StageReport
from ispa import AttentionSession
from ispa.quantized_cache import kv_layer_factory

__all__ = ["REF_SHIFT_RANGE", "DenoisingStage", "ReferenceExchange", "synchronize"]

REF_SHIFT_RANGE = (4, 30)  # the official `random.randint(4, 30)`, redrawn every forward


class ReferenceExchange(Protocol):
    """How the stages of one run share block 0's first latent frame (only needed when they are several)."""

    def share(self, reference: torch.Tensor) -> None: ...

    def fetch(self) -> torch.Tensor: ...


class DenoisingStage:
    """Steps `steps` (default: all of the schedule's) of every block of the run `spec`, with their session."""

    def __init__(
        self,
        dit: LiveAvatarDiT,
        schedule: DenoisingSchedule,
        spec: RunSpec,
        steps: range | None = None,
        *,
        statistics_reducer: Callable[[list[torch.Tensor]], None] | None = None,
        reference_exchange: ReferenceExchange | None = None,
    ) -> None:
        self.dit = dit
        self.schedule = schedule
        self.run = spec.run
        self.steps = range(schedule.steps) if steps is None else steps
        if not 0 <= self.steps.start < self.steps.stop <= schedule.steps:
            raise ValueError(f"steps {self.steps} are not within the schedule's {schedule.steps} steps")
        device = dit.device
        self.context = TextContext(spec.context_states.to(device))
        layout = cache_layout(dit.tokens_per_frame(spec.latent_h, spec.latent_w), schedule.steps)
        self.session = AttentionSession(
            spec.policy,
            num_layers=dit.config.num_layers,
            layout=layout,
            kv_layer=kv_layer_factory(spec.kv_format),
            statistics_precision=spec.statistics_precision,
            fused_merge=spec.fused_merge,
            statistics_reducer=statistics_reducer,
        )
        motion = spec.motion_latents.to(device)
        dit.prefill_sink(self.session, spec.ref_latent.to(device), motion, self.context)
        self._motion_latents = motion if spec.refresh_sink else None
        self._reference: torch.Tensor | None = None  # block 0's first latent frame, once known here
        self._exchange = reference_exchange
        self._ref_shifts = random.Random(spec.seed)
        self._seconds = 0.0  # of the current block, spent in this stage's own work

    @property
    def owns_last_step(self) -> bool:
        """Whether a block leaves this stage fully denoised."""
        return self.steps.stop == self.schedule.steps

    def denoise(self, work: BlockWork) -> Iterator[torch.Tensor]:
        """Run this stage's steps of `work`'s block, yielding the latents after each step (the caller may do other
        work in between: that time is not this stage's); the last value yielded is what the stage hands on."""
        started = time.perf_counter()
        dit, device = self.dit, self.dit.device
        ref_shifts = [self._ref_shifts.randint(*REF_SHIFT_RANGE) for _ in range(self.schedule.steps)]
        if self._motion_latents is not None and work.block == BLOCKS_PER_CLIP:
            self._refresh_sink()
        if work.mass_sums is not None:
            self.session.continue_history_mass(
                [None if t is None else t.to(device) for t in work.mass_sums], work.mass_counts
            )
        latents = work.latents.to(device)
        audio = type(work.audio)(*(t.to(device) for t in work.audio))
        for step in self.steps:
            flow = dit.forward_block(
                self.session,
                latents,
                self.schedule.timesteps[step],
                self.context,
                audio,
                frame_index=work.block * LATENT_FRAMES_PER_BLOCK,
                ring=step,
                ref_shift=ref_shifts[step],
            )
            latents = euler_step(latents, flow, self.schedule.sigmas[step], self.schedule.sigmas[step + 1])
            self._seconds += time.perf_counter() - started
            yield latents
            started = time.perf_counter()
        self._seconds += time.perf_counter() - started

    def handed_on(self, work: BlockWork, latents: torch.Tensor, recalibrate: bool) -> BlockWork:
        """The block as the next stage takes it: its latents, the history-share sums so far, the request."""
        sums, counts = self.session.history_mass_sums()
        return BlockWork(self.run, work.block, latents, work.audio, recalibrate, sums, counts)

    def end_block(self, work: BlockWork) -> StageReport:
        """Close the block `work` (as handed on): the policy may absorb or recalibrate here; this stage's report."""
        started = time.perf_counter()
        if work.recalibrate:
            self.session.request_recalibration()
        engine = self.session.end_block()
        synchronize(self.dit.device)
        if self._motion_latents is not None and work.block == 0 and self.owns_last_step:
            self._reference = work.latents[:, :, :1]
            if self._exchange is not None:
                self._exchange.share(self._reference)
        seconds, self._seconds = self._seconds + time.perf_counter() - started, 0.0
        sink = [layer.sink_nbytes() for layer in self.session.cache.layers]
        return StageReport(self.run, work.block, engine, sink, seconds)

    def close(self) -> None:
        self.session.close()

    def _refresh_sink(self) -> None:
        """Prefill the sink again with block 0's first latent frame, as the official pipeline does at clip 1."""
        reference = self._reference
        if reference is None:
            if self._exchange is None:
                raise RuntimeError("the sink refresh needs block 0's latents, and no stage shared them")
            reference = self._exchange.fetch()
        self.dit.prefill_sink(self.session, reference.to(self.dit.device), self._motion_latents, self.context)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (on CUDA), so that a block's seconds are its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
