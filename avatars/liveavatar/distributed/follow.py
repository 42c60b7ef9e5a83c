"""Ranks 1.. of the pipeline: take work from the rank upstream, do this rank's stage of it, pass it on, until the
shutdown.

Work arrives in one ordered stream (`Tag.DOWN`): a run's `RunSpec`, its blocks, its end; several runs may be
open at once (compare mode's two streams take turns), each with its own stage, found by the run's number. A
DiT rank passes each spec and each end on before acting on it, so the ranks downstream set up in parallel.
"""

from __future__ import annotations

from datetime import timedelta

from avatars.liveavatar.distributed.channel import Tag
from avatars.liveavatar.distributed.messages import BlockWork, DecodedBlock, RunSpec
from avatars.liveavatar.distributed.stage_models import StageModels
from avatars.liveavatar.distributed.stages import DecoderStage, DiTStage
from avatars.liveavatar.distributed.world import PipelineWorld

__all__ = ["follow_runs"]

# Work may be long in coming, between runs and within one (rank 0 feeds blocks as fast as its consumer takes chunks:
# a live microphone, a slow client). A dead peer is noticed at once by its closed connection, and rank 0 bounds its
# own waits by the group's timeout, so a hung rank is reported there.
_WAIT_FOR_WORK = timedelta(days=365)


def follow_runs(models: StageModels, world: PipelineWorld) -> int:
    """Follow rank 0's runs with this rank's `models` until rank 0 shuts the pipeline down; returns how many
    runs were followed."""
    if world.is_lead:
        raise ValueError("rank 0 leads the pipeline; it does not follow")
    layout, channel = world.layout, world.channel
    upstream, onward = layout.upstream(world.rank), layout.downstream(world.rank)
    decodes_only = world.rank >= layout.dit_ranks
    stages: dict[int, DiTStage | DecoderStage] = {}
    runs = 0
    try:
        while True:
            message: RunSpec | BlockWork | None = channel.recv(upstream, Tag.DOWN, timeout=_WAIT_FOR_WORK)
            if onward is not None and not isinstance(message, BlockWork):
                channel.send(message, onward, Tag.DOWN)
            if message is None:
                channel.flush()
                return runs
            if isinstance(message, RunSpec):
                stages[message.run] = (
                    DecoderStage(models, message) if decodes_only else DiTStage(models, world, message)
                )
                runs += 1
            elif message.latents is not None:
                stage = stages[message.run]
                if isinstance(stage, DecoderStage):
                    channel.send(stage.decode(message.block, message.latents), 0, Tag.FRAMES)
                else:
                    stage.process(message)
            else:
                stage = stages.pop(message.run)
                if isinstance(stage, DecoderStage):
                    channel.send(DecodedBlock(message.run, message.block), 0, Tag.FRAMES)
                else:
                    stage.end(message.block)
                    stage.close()
    finally:
        for stage in stages.values():
            if isinstance(stage, DiTStage):
                stage.close()
