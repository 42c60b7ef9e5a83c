"""Rank 0 of the pipeline: hands out a run to every rank, feeds its blocks in and gathers the finished chunks.

Rank 0 is DiT rank 0: it reads the audio, draws each clip's noise from `seed + clip` exactly as one process does,
encodes the audio tokens, runs its own steps and sends the block on. The chunk of block k comes back (frames from
the decoder, report parts from the other DiT ranks) while rank 0 works on block k + stages - 1, so chunks are
handed out one pipeline depth behind the blocks fed in. Cancel and recalibration are taken between blocks here and
travel down the pipeline with the block they apply to, so every rank acts on the same block a single process
would; after a cancel the blocks in flight are drained and dropped, and every rank is ready for the next run.

Several streams may be open at once (compare mode's Full and ISPA runs take turns): each run has its number in
every message and its own stage on every rank, and one step of one stream runs at a time on rank 0. Once a rank
has failed, the pipeline is down: every later stream is refused with the first failure's message.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from avatars.base import AvatarChunk, ChunkReport, ChunkTimings, GenerationRequest
from avatars.liveavatar.block_layout import (
    BLOCKS_PER_CLIP,
    DROPPED_FIRST_FRAMES,
    FPS,
    LATENT_FRAMES_PER_BLOCK,
    VIDEO_FRAMES_PER_BLOCK,
)
from avatars.liveavatar.distributed.channel import RankFailure, Tag
from avatars.liveavatar.distributed.messages import BlockWork, DecodedBlock, RunSpec, StageReport
from avatars.liveavatar.distributed.report_merge import merge_stage_reports
from avatars.liveavatar.distributed.stage_models import StageModels
from avatars.liveavatar.distributed.stages import DiTStage
from avatars.liveavatar.distributed.world import PipelineWorld
from avatars.liveavatar.dit import block_audio_window
from avatars.liveavatar.dit.audio_encoder import AudioTokens
from avatars.liveavatar.pipeline import LiveAvatarPipeline, RunControl, SharedDecoderWarmup, _AudioTimeline
from avatars.liveavatar.sizing import fit_portrait
from ispa import ISPAPolicy, Policy

__all__ = ["PipelineLead"]


class PipelineLead:
    """`stream()` has the signature and the output of `LiveAvatarPipeline.stream`, run over every rank; the
    lead also answers what a caller reads of a pipeline (its device, label, sizes), so it can stand in for one."""

    def __init__(self, pipeline: LiveAvatarPipeline, world: PipelineWorld) -> None:
        if not world.is_lead:
            raise ValueError(f"only rank 0 leads the pipeline (this is rank {world.rank})")
        self.pipeline = pipeline
        self.world = world
        self._run_numbers = itertools.count()
        self._step_lock = threading.Lock()  # one step of one stream at a time: the channel is not thread-safe
        self._failure: RankFailure | None = None

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    @property
    def label(self) -> str:
        layout = self.world.layout
        return (
            f"{self.pipeline.label} · on {layout.world_size} processes ({layout.dit_ranks} DiT "
            f"rank{'s' if layout.dit_ranks > 1 else ''}, the decoder on rank {layout.decoder_rank})"
        )

    @property
    def is_test_model(self) -> bool:
        return self.pipeline.is_test_model

    @property
    def sample_rate(self) -> int:
        return self.pipeline.sample_rate

    @property
    def size_divisor(self) -> int:
        return self.pipeline.size_divisor

    def size_choices(self) -> list[tuple[str, int]]:
        return self.pipeline.size_choices()

    def output_size(self, portrait: np.ndarray, max_area: int | None = None) -> tuple[int, int]:
        return self.pipeline.output_size(portrait, max_area)

    def stream(
        self,
        request: GenerationRequest,
        policy: Policy,
        *,
        max_area: int | None = None,
        control: RunControl | None = None,
        kv_format: str = "bf16",
        refresh_sink: bool = False,
        shared_warmup: SharedDecoderWarmup | None = None,
    ) -> Iterator[AvatarChunk]:
        """`shared_warmup` is taken for the one-process signature and not used: the decoder rank warms each
        run's decoder as soon as the run's spec reaches it, while the DiT ranks work on the first block."""
        self._check_up()
        height, width, _ = self.pipeline.check_run(request, policy, max_area, kv_format, refresh_sink)
        if isinstance(policy, ISPAPolicy) and policy.auto_recalibrate:
            raise ValueError(
                "auto_recalibrate is not available on several GPUs: its decision needs every step's history "
                "share at each block's end, which would stall the pipeline every block (recalibrate on request)"
            )
        run = self._lead_run(request, policy, height, width, control or RunControl(), kv_format, refresh_sink)
        return self._one_step_at_a_time(run)

    def shutdown(self) -> None:
        """Tell every other rank that no more runs come, and wait until they have heard it (nothing is sent
        once the pipeline is down: the failed rank would never hear it)."""
        with self._step_lock:
            if self._failure is not None:
                return
            self.world.channel.send(None, self.world.layout.downstream(0), Tag.DOWN)
            self.world.channel.flush()

    def _check_up(self) -> None:
        if self._failure is not None:
            raise RankFailure(f"the pipeline is down since a rank failed ({self._failure}); restart it")

    def _one_step_at_a_time(self, run: Iterator[AvatarChunk]) -> Iterator[AvatarChunk]:
        """`run`'s steps, each under the step lock; the first rank failure marks the pipeline down."""
        try:
            while True:
                with self._step_lock:
                    self._check_up()
                    try:
                        chunk = next(run, None)
                    except RankFailure as err:
                        self._failure = err
                        raise
                if chunk is None:
                    return
                yield chunk
        finally:
            with self._step_lock:
                run.close()

    def _lead_run(
        self,
        request: GenerationRequest,
        policy: Policy,
        height: int,
        width: int,
        control: RunControl,
        kv_format: str,
        refresh_sink: bool,
    ) -> Iterator[AvatarChunk]:
        pipeline, world = self.pipeline, self.world
        dit, device = pipeline.dit, pipeline.device
        run = next(self._run_numbers)
        audio = _AudioTimeline(request.audio, request.sample_rate, pipeline.audio_encoder)
        fitted = fit_portrait(request.portrait, height, width)
        latent_h, latent_w = height // 8, width // 8
        context = dit.embed_text(pipeline.text_encoder.encode(request.prompt)[None].to(device))
        portrait_latents = pipeline.portrait_latents.get(fitted)
        spec = RunSpec(
            run,
            policy,
            kv_format,
            refresh_sink,
            request.seed,
            context.states.cpu(),
            portrait_latents.reference.cpu(),
            portrait_latents.motion.cpu(),
            latent_h,
            latent_w,
        )
        world.channel.send(spec, world.layout.downstream(0), Tag.DOWN)
        stage = DiTStage(StageModels.of_pipeline(pipeline), world, spec)
        gather = _ChunkGatherer(world, run, audio)
        in_flight: deque[tuple[int, int]] = deque()  # (block, frames with audio) sent in, not yet back
        depth = world.layout.stages - 1
        sent = 0
        ended = failed = False
        try:
            for block, (features, valid_frames) in enumerate(audio.feature_blocks()):
                if control.cancelled:
                    break
                recalibrate = control.take_recalibration()
                within_clip = block % BLOCKS_PER_CLIP
                if within_clip == 0:
                    generator = torch.Generator(device).manual_seed(request.seed + block // BLOCKS_PER_CLIP)
                    shape = (
                        1,
                        dit.config.in_dim,
                        LATENT_FRAMES_PER_BLOCK * BLOCKS_PER_CLIP,
                        latent_h,
                        latent_w,
                    )
                    clip_noise = torch.randn(shape, generator=generator, device=device, dtype=dit.dtype)
                first = within_clip * LATENT_FRAMES_PER_BLOCK
                latents = clip_noise[:, :, first : first + LATENT_FRAMES_PER_BLOCK]
                window = block_audio_window(
                    features.permute(1, 2, 0)[None].to(device), 0, VIDEO_FRAMES_PER_BLOCK
                )
                tokens = AudioTokens(*(t.cpu() for t in dit.encode_audio(window)))
                gather.own.append(stage.process(BlockWork(run, block, latents, tokens, recalibrate)))
                sent += 1
                in_flight.append((block, valid_frames))
                while len(in_flight) > depth:
                    chunk = gather.chunk(*in_flight.popleft())
                    if chunk is not None:
                        yield chunk
            stage.end(sent)
            ended = True
            while in_flight:
                chunk = gather.chunk(*in_flight.popleft())
                if chunk is not None and not control.cancelled:
                    yield chunk
        except GeneratorExit:
            raise
        except BaseException:
            failed = True  # a peer may be gone: nothing more is waited for
            raise
        finally:
            if not failed and self._failure is None:
                # Finished, cancelled or closed by the consumer: end the run on every rank, drop what is left.
                if not ended:
                    stage.end(sent)
                while in_flight:
                    gather.chunk(*in_flight.popleft())
                gather.end()
            stage.close()


class _ChunkGatherer:
    """Rebuilds each block's chunk on rank 0 from the decoder's frames and the DiT ranks' report parts."""

    def __init__(self, world: PipelineWorld, run: int, audio: _AudioTimeline) -> None:
        self.world = world
        self.run = run
        self.audio = audio
        self.own: deque[StageReport] = deque()  # rank 0's own report parts, in block order
        self.video_frames_done = 0  # frames of the model's timeline handed out or dropped

    def chunk(self, block: int, valid_frames: int) -> AvatarChunk | None:
        layout, channel = self.world.layout, self.world.channel
        decoded: DecodedBlock = channel.recv_run(layout.decoder_rank, Tag.FRAMES, self.run)
        others = [channel.recv_run(rank, Tag.REPORT, self.run) for rank in range(1, layout.dit_ranks)]
        parts = [self.own.popleft(), *others]
        if decoded.block != block or decoded.frames is None:
            raise RuntimeError(
                f"the decoder sent block {decoded.block} while rank 0 waited for block {block}"
            )
        engine = merge_stage_reports(parts)
        start = DROPPED_FIRST_FRAMES if block == 0 else 0
        stop = min(VIDEO_FRAMES_PER_BLOCK, valid_frames)
        first_frame = self.video_frames_done + start
        self.video_frames_done += VIDEO_FRAMES_PER_BLOCK
        if stop <= start:
            return None
        frames = decoded.frames[start:stop]
        last_frame = first_frame + len(frames)
        timings = ChunkTimings(
            model_seconds=sum(p.seconds for p in parts), decode_seconds=decoded.decode_seconds
        )
        return AvatarChunk(
            index=block,
            frames=frames,
            audio=self.audio.samples_for_frames(first_frame, last_frame, FPS),
            sample_rate=self.audio.sample_rate,
            fps=FPS,
            report=ChunkReport(
                engine=engine, timings=timings, frames=len(frames), end_seconds=last_frame / FPS
            ),
        )

    def end(self) -> None:
        """Take the decoder's end-of-run mark (every block before it has been gathered)."""
        decoded: DecodedBlock = self.world.channel.recv_run(
            self.world.layout.decoder_rank, Tag.FRAMES, self.run
        )
        if decoded.frames is not None:
            raise RuntimeError(f"the decoder sent block {decoded.block} after the end of the run")
