"""The block loop: every run, on one process or over a pipeline of ranks, is this loop on the process that leads it.

Per block k (latent frames 3k..3k+2, video frames 12k..12k+11 at 25 fps):
1. the block's 12 wav2vec2 features → the DiT's audio tokens (`AudioTimeline`, `block_audio_window`);
2. noise for the block from the run's own generator — one draw per 4-block clip seeded `seed + clip`, the
   official single-GPU layout;
3. the lead's own denoising steps (`DenoisingStage`: all four on one process, its share on a pipeline), then the
   block is handed on (`Downstream`: decoded here, or sent to the next rank) and ended (`end_block`: the policy
   may absorb or recalibrate; a recalibration request is taken once per block, just before this);
4. chunks come back in block order (`ChunkAssembler`) as soon as their frames exist: between the lead's steps when
   they are ready, and at the latest when more than `depth` blocks are in flight.
A cancel is seen at each block's start and after each chunk handed out. From then on no block starts, the block
in progress is abandoned, and of the blocks in flight those the lead has fully denoised (it owns the last step)
are still decoded and handed out, while those still being denoised on other ranks are dropped. Closing the
generator ends the run in every stage.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from avatars.base import AvatarChunk, RunControl
from avatars.liveavatar.block_layout import BLOCKS_PER_CLIP, LATENT_FRAMES_PER_BLOCK, VIDEO_FRAMES_PER_BLOCK
from avatars.liveavatar.dit import LiveAvatarDiT, block_audio_window
from avatars.liveavatar.dit.audio_encoder import AudioTokens
from avatars.liveavatar.streaming.audio_timeline import AudioTimeline
from avatars.liveavatar.streaming.chunks import ChunkAssembler, DecodedFrames
from avatars.liveavatar.streaming.messages import BlockWork, StageReport
from avatars.liveavatar.streaming.stage import DenoisingStage

__all__ = ["BlockNoise", "Downstream", "stream_blocks"]


class Downstream(Protocol):
    """Where the lead hands each block after its own steps, and where the block's frames come back from."""

    depth: int  # blocks whose chunk may still be pending after the lead ends a block
    in_flight_at_block_end: int  # earlier blocks that may still be pending when the lead ends a block

    def hand_on(self, work: BlockWork) -> None: ...

    def ready(self) -> bool:
        """Whether the oldest pending block's frames can be collected without waiting."""
        ...

    def collect(self) -> tuple[DecodedFrames, list[StageReport]]:
        """The oldest pending block's frames and the reports of the stages after the lead, in step order."""
        ...

    def finish(self, blocks: int) -> None:
        """The run ends after `blocks` blocks: end it in every stage, dropping what was not collected."""
        ...

    def close(self) -> None: ...


class BlockNoise:
    """The run's noise: one draw per clip of 4 blocks from a generator seeded `seed + clip`, sliced per block."""

    def __init__(self, dit: LiveAvatarDiT, seed: int, latent_h: int, latent_w: int) -> None:
        self._dit = dit
        self._seed = seed
        self._shape = (1, dit.config.in_dim, LATENT_FRAMES_PER_BLOCK * BLOCKS_PER_CLIP, latent_h, latent_w)
        self._clip: torch.Tensor | None = None

    def block(self, block: int) -> torch.Tensor:
        within_clip = block % BLOCKS_PER_CLIP
        if within_clip == 0:
            device = self._dit.device
            generator = torch.Generator(device).manual_seed(self._seed + block // BLOCKS_PER_CLIP)
            self._clip = torch.randn(self._shape, generator=generator, device=device, dtype=self._dit.dtype)
        first = within_clip * LATENT_FRAMES_PER_BLOCK
        return self._clip[:, :, first : first + LATENT_FRAMES_PER_BLOCK]


def audio_tokens(dit: LiveAvatarDiT, features: torch.Tensor) -> AudioTokens:
    """The DiT's audio tokens of one block from its features [12, layers, dim]."""
    window = block_audio_window(features.permute(1, 2, 0)[None].to(dit.device), 0, VIDEO_FRAMES_PER_BLOCK)
    return dit.encode_audio(window)


class _Cancelled(Exception):
    """The run's control was cancelled: no block starts any more."""


@dataclass
class _InFlight:
    block: int
    valid_frames: int  # of the block's frames, those the audio covers
    report: StageReport  # the lead's own part


def stream_blocks(
    stage: DenoisingStage,
    downstream: Downstream,
    audio: AudioTimeline,
    noise: BlockNoise,
    control: RunControl,
) -> Iterator[AvatarChunk]:
    """The run's chunks, led from this process; `stage` holds the lead's own steps (step 0 onward)."""
    if stage.steps.start != 0:
        raise ValueError("the lead runs the first denoising step")
    assembler = ChunkAssembler(audio)
    in_flight: deque[_InFlight] = deque()
    sent = 0
    failed = False

    def next_chunk() -> AvatarChunk | None:
        pending = in_flight.popleft()
        decoded, others = downstream.collect()
        return assembler.chunk(pending.block, pending.valid_frames, decoded, [pending.report, *others])

    def hand_out() -> Iterator[AvatarChunk]:
        """Yield the oldest pending block's chunk, then honour a cancel."""
        chunk = next_chunk()
        if chunk is not None:
            yield chunk
        if control.cancelled:
            raise _Cancelled

    try:
        try:
            for block, (features, valid_frames) in enumerate(audio.feature_blocks()):
                if control.cancelled:
                    raise _Cancelled
                started = time.perf_counter()
                work = BlockWork(stage.run, block, noise.block(block), audio_tokens(stage.dit, features))
                inputs_seconds = time.perf_counter() - started
                for denoised_so_far in stage.denoise(work):
                    latents = denoised_so_far
                    while in_flight and downstream.ready():
                        yield from hand_out()
                while len(in_flight) > downstream.in_flight_at_block_end:
                    yield from hand_out()
                work = stage.handed_on(work, latents, recalibrate=control.take_recalibration())
                downstream.hand_on(work)
                sent += 1
                report = stage.end_block(work)
                own = replace(report, seconds=report.seconds + inputs_seconds)
                in_flight.append(_InFlight(block, valid_frames, own))
                while len(in_flight) > downstream.depth:
                    yield from hand_out()
            while in_flight:
                yield from hand_out()
        except _Cancelled:
            if not stage.owns_last_step:  # still being denoised elsewhere: dropped
                in_flight.clear()
            while in_flight:
                chunk = next_chunk()
                if chunk is not None:
                    yield chunk
    except GeneratorExit:
        raise
    except BaseException:
        failed = True  # a peer may be gone: nothing more is waited for
        raise
    finally:
        try:
            if not failed:
                downstream.finish(sent)
        finally:
            downstream.close()  # first: a decode in flight still uses the device
            stage.close()
