"""Rank 0 of the pipeline: the backend the app and the CLI use under torchrun (`AvatarBackend`).

Rank 0 runs the block loop (`stream_blocks`) exactly as one process does, with its own DiT steps (DiT rank 0) and
the other ranks behind it (`RankDownstream`): each block goes down the pipeline after rank 0's steps, and its chunk
is rebuilt from the decoder's frames and the DiT ranks' report parts while rank 0 works on block
k + stages − 1, so chunks are handed out one pipeline depth behind the blocks fed in.

Several streams may be open at once (compare mode's Full and ISPA runs take turns): each run has its number in
every message and its own stage on every rank, and one step of one stream runs at a time on rank 0. While rank 0
sends nothing down for a while (between runs, or waiting for a live speaker) a keep-alive goes down, so a follower
notices a hung lead within the group's timeout. Once a rank has failed, the pipeline is down: every later stream
is refused with the first failure's message.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import numpy as np
import torch

from avatars.base import AvatarChunk, GenerationRequest, RunControl
from avatars.liveavatar.distributed.channel import RankFailure, Tag
from avatars.liveavatar.distributed.follow import dit_stage
from avatars.liveavatar.distributed.messages import KeepAlive
from avatars.liveavatar.distributed.stage_models import StageModels
from avatars.liveavatar.distributed.world import PipelineWorld
from avatars.liveavatar.pipeline import LiveAvatarPipeline
from avatars.liveavatar.streaming.audio_timeline import AudioTimeline
from avatars.liveavatar.streaming.block_loop import BlockNoise, stream_blocks
from avatars.liveavatar.streaming.chunks import DecodedFrames
from avatars.liveavatar.streaming.messages import BlockWork, DecodedBlock, StageReport
from avatars.memory import MemoryPlan
from ispa import ISPAPolicy, Policy

__all__ = ["PipelineLead", "RankDownstream"]

logger = logging.getLogger(__name__)


class PipelineLead:
    """LiveAvatar over every rank of `world`, led from rank 0 with `pipeline` (rank 0's models). `keep_alive`:
    send keep-alives down while idle (off only where no process group exists, e.g. to plan memory)."""

    def __init__(
        self, pipeline: LiveAvatarPipeline, world: PipelineWorld, *, keep_alive: bool = True
    ) -> None:
        if not world.is_lead:
            raise ValueError(f"only rank 0 leads the pipeline (this is rank {world.rank})")
        self.pipeline = pipeline
        self.world = world
        layout = world.layout
        self.label = (
            f"{pipeline.label} · on {layout.world_size} processes ({layout.dit_ranks} DiT "
            f"rank{'s' if layout.dit_ranks > 1 else ''}, the decoder on rank {layout.decoder_rank})"
        )
        self.is_test_model = pipeline.is_test_model
        self.sample_rate = pipeline.sample_rate
        self.fps = pipeline.fps
        self._step_lock = threading.Lock()  # one step of one stream at a time: receives are not thread-safe
        self._failure: RankFailure | None = None
        self._stop_keepalive = threading.Event()
        self._keepalive = threading.Thread(target=self._keep_alive, name="pipeline-keepalive", daemon=True)
        if keep_alive:
            self._keepalive.start()

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    def size_choices(self) -> list[tuple[str, int]]:
        return self.pipeline.size_choices()

    def output_size(self, portrait: np.ndarray, max_area: int | None = None) -> tuple[int, int]:
        return self.pipeline.output_size(portrait, max_area)

    def planned_size(self, max_area: int) -> tuple[int, int]:
        return self.pipeline.planned_size(max_area)

    def memory_plans(self, height: int, width: int, policy: Policy, kv_format: str) -> list[MemoryPlan]:
        """One plan per role of the layout's ranks (rank 0 with the encoders, the other DiT ranks, the decoder)."""
        return self.pipeline.memory_plans(height, width, policy, kv_format, layout=self.world.layout)

    def stream(self, request: GenerationRequest, control: RunControl | None = None) -> Iterator[AvatarChunk]:
        """The decoder rank warms each run's decoder as soon as the run's spec reaches it, while the DiT ranks
        work on the first block (it keeps no warmed decoder between runs: the latents reach it anew each run)."""
        self._check_up()
        height, width = self.pipeline.check_run(request)
        self.world.layout.check_steps(request.steps)
        if isinstance(request.policy, ISPAPolicy) and request.policy.auto_recalibrate:
            raise ValueError(
                "auto_recalibrate is not available on several GPUs: its decision needs every step's history "
                "share at each block's end, which would stall the pipeline every block (recalibrate on request)"
            )
        return self._one_step_at_a_time(self._run(request, height, width, control or RunControl()))

    def close(self) -> None:
        """Tell every other rank that no more runs come, and wait until they have heard it (nothing is sent
        once the pipeline is down: the failed rank would never hear it)."""
        self._stop_keepalive.set()
        if self._keepalive.is_alive():
            self._keepalive.join()
        with self._step_lock:
            if self._failure is not None:
                return
            self.world.channel.send(None, self.world.layout.downstream(0), Tag.DOWN)
            self.world.channel.flush()

    @property
    def is_down(self) -> bool:
        return self._failure is not None

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

    def _run(
        self, request: GenerationRequest, height: int, width: int, control: RunControl
    ) -> Iterator[AvatarChunk]:
        pipeline, world = self.pipeline, self.world
        audio = AudioTimeline(request.audio, request.sample_rate, pipeline.audio_encoder)
        spec, _ = pipeline.run_spec(request, height, width)
        world.channel.send(spec, world.layout.downstream(0), Tag.DOWN)
        downstream = RankDownstream(self, spec.run)
        try:
            stage = dit_stage(StageModels.of_pipeline(pipeline), world, spec)
        except BaseException:
            downstream.finish(0)  # the other ranks have opened the run: close it there
            raise
        noise = BlockNoise(pipeline.dit, spec.seed, spec.latent_h, spec.latent_w)
        del spec
        yield from stream_blocks(stage, downstream, audio, noise, control)

    def _keep_alive(self) -> None:
        interval = self.world.timeout.total_seconds() / 4
        first = self.world.layout.downstream(0)
        while not self._stop_keepalive.wait(interval / 4):
            if self._failure is not None:
                return
            if self.world.channel.seconds_since_send(first) >= interval:
                try:
                    self.world.channel.send(KeepAlive(), first, Tag.DOWN)
                except RankFailure as err:
                    logger.warning("the keep-alive could not be sent: %s", err)
                    return


class RankDownstream:
    """The ranks behind rank 0 for one run: blocks go down the pipeline, frames and report parts come back."""

    def __init__(self, lead: PipelineLead, run: int) -> None:
        self._lead = lead
        self._world = lead.world
        self._run = run
        self.depth = self._world.layout.stages - 1
        self.in_flight_at_block_end = self.depth  # rank 0 never waits for a chunk before sending a block on
        self._pending = 0

    def hand_on(self, work: BlockWork) -> None:
        self._world.channel.send(work, self._world.layout.downstream(0), Tag.DOWN)
        self._pending += 1

    def ready(self) -> bool:
        return False  # a chunk is collected when the pipeline is full, or at the end

    def collect(self) -> tuple[DecodedFrames, list[StageReport]]:
        layout, channel = self._world.layout, self._world.channel
        decoded: DecodedBlock = channel.recv_run(layout.decoder_rank, Tag.FRAMES, self._run)
        others = [channel.recv_run(rank, Tag.REPORT, self._run) for rank in range(1, layout.dit_ranks)]
        self._pending -= 1
        if decoded.frames is None or any(part.block != decoded.block for part in others):
            raise RuntimeError(
                f"rank 0 expected block {decoded.block} from every rank, got "
                f"{[decoded.block if decoded.frames is not None else 'the end', *(p.block for p in others)]}"
            )
        return DecodedFrames(decoded.frames.cpu().numpy(), decoded.decode_seconds), others

    def finish(self, blocks: int) -> None:
        """End the run on every rank and drop the blocks still in the pipeline (nothing is sent or waited for
        once the pipeline is down: a peer may be gone)."""
        if self._lead.is_down:
            return
        channel = self._world.channel
        channel.send(BlockWork(self._run, blocks), self._world.layout.downstream(0), Tag.DOWN)
        while self._pending:
            self.collect()
        end: DecodedBlock = channel.recv_run(self._world.layout.decoder_rank, Tag.FRAMES, self._run)
        if end.frames is not None:
            raise RuntimeError(f"the decoder sent block {end.block} after the end of the run")

    def close(self) -> None:
        pass
