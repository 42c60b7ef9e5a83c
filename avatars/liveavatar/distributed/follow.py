"""Ranks 1.. of the pipeline: wait for a run from rank 0, do their stage of every block, repeat until shutdown."""

from __future__ import annotations

from datetime import timedelta

from avatars.liveavatar.distributed.channel import Tag
from avatars.liveavatar.distributed.messages import BlockWork, DecodedBlock, RunSpec
from avatars.liveavatar.distributed.stages import DecoderStage, DiTStage
from avatars.liveavatar.distributed.world import PipelineWorld
from avatars.liveavatar.pipeline import LiveAvatarPipeline

__all__ = ["follow_runs"]

# Between runs a rank may wait for work as long as the app stays up (a dead rank 0 is noticed at once anyway).
_WAIT_FOR_WORK = timedelta(days=365)


def follow_runs(pipeline: LiveAvatarPipeline, world: PipelineWorld) -> int:
    """Follow rank 0's runs until it shuts the pipeline down; returns how many runs were followed."""
    if world.is_lead:
        raise ValueError("rank 0 leads the pipeline; it does not follow")
    runs = 0
    while True:
        spec: RunSpec | None = world.channel.recv(0, Tag.CONTROL, timeout=_WAIT_FOR_WORK)
        if spec is None:
            world.channel.flush()
            return runs
        _follow_run(pipeline, world, spec)
        runs += 1


def _follow_run(pipeline: LiveAvatarPipeline, world: PipelineWorld, spec: RunSpec) -> None:
    layout, channel = world.layout, world.channel
    if world.rank < layout.dit_ranks:
        stage = DiTStage(pipeline, world, spec)
        try:
            while True:
                work: BlockWork = channel.recv(world.rank - 1, Tag.BLOCK)
                if work.latents is None:
                    stage.end(work.block)
                    break
                stage.process(work)
        finally:
            stage.close()
    else:
        decoder = DecoderStage(pipeline, spec)
        while True:
            work = channel.recv(layout.last_dit, Tag.BLOCK)
            if work.latents is None:
                channel.send(DecodedBlock(work.block), 0, Tag.FRAMES)
                break
            channel.send(decoder.decode(work.block, work.latents), 0, Tag.FRAMES)
    channel.flush()
