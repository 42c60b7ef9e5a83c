"""Ranks 1.. of the pipeline: take work from the rank upstream, run this rank's stage of it, pass it on, until the
shutdown.

Work arrives in one ordered stream (`Tag.DOWN`): a run's `RunSpec`, its blocks, its end, keep-alives; several runs
may be open at once (compare mode's two streams take turns), each with its own stage, found by the run's number.
A DiT rank passes each spec, end and keep-alive on before acting on it, so the ranks downstream set up in parallel,
and sends each block on before ending it, so the next rank starts at once. The stages are the block loop's own
(`DenoisingStage`, `DecoderStage`); this module only moves their inputs and outputs between ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avatars.liveavatar.distributed.channel import RankFailure, Tag
from avatars.liveavatar.distributed.messages import KeepAlive
from avatars.liveavatar.distributed.stage_models import StageModels
from avatars.liveavatar.distributed.world import PipelineWorld
from avatars.liveavatar.schedule import DenoisingSchedule
from avatars.liveavatar.streaming.decoding import DecoderStage
from avatars.liveavatar.streaming.messages import BlockWork, DecodedBlock, Reference, RunSpec
from avatars.liveavatar.streaming.stage import DenoisingStage

__all__ = ["RankReferences", "dit_stage", "follow_runs"]


class RankReferences:
    """The sink-refresh reference of one run between DiT ranks: the last DiT rank shares block 0's first latent
    frame with the others, which take it when clip 1 starts."""

    def __init__(self, world: PipelineWorld, run: int) -> None:
        self._world = world
        self._run = run

    def share(self, reference: torch.Tensor) -> None:
        for rank in range(self._world.layout.last_dit):
            self._world.channel.send(Reference(self._run, reference.cpu()), rank, Tag.REFERENCE)

    def fetch(self) -> torch.Tensor:
        return self._world.channel.recv_run(self._world.layout.last_dit, Tag.REFERENCE, self._run).latent


def dit_stage(models: StageModels, world: PipelineWorld, spec: RunSpec) -> DenoisingStage:
    """This DiT rank's stage of run `spec`: its steps, the statistics summed over the DiT ranks."""
    if models.dit is None:
        raise ValueError(f"rank {world.rank} holds no DiT, so it cannot run DiT steps")
    layout = world.layout
    return DenoisingStage(
        models.dit,
        DenoisingSchedule.liveavatar(spec.steps),
        spec,
        layout.steps(world.rank, spec.steps),
        statistics_reducer=world.sum_statistics if layout.dit_ranks > 1 else None,
        reference_exchange=RankReferences(world, spec.run),
    )


@dataclass
class _Run:
    """What this rank holds of one run: its DiT stage and/or its decoder."""

    stage: DenoisingStage | None
    decoder: DecoderStage | None


def follow_runs(models: StageModels, world: PipelineWorld) -> int:
    """Follow rank 0's runs with this rank's `models` until rank 0 shuts the pipeline down; returns how many
    runs were followed. Upstream silent for longer than the group's timeout (no work, no keep-alive) raises
    `RankFailure`."""
    if world.is_lead:
        raise ValueError("rank 0 leads the pipeline; it does not follow")
    layout, channel = world.layout, world.channel
    upstream, onward = layout.upstream(world.rank), layout.downstream(world.rank)
    on_dit, decodes = world.rank < layout.dit_ranks, world.rank == layout.decoder_rank
    runs: dict[int, _Run] = {}
    followed = 0
    try:
        while True:
            try:
                message = channel.recv(upstream, Tag.DOWN, timeout=world.timeout)
            except RankFailure as err:
                raise RankFailure(f"{err} (nothing from upstream within {world.timeout})") from err
            if onward is not None and not isinstance(message, BlockWork):
                channel.send(message, onward, Tag.DOWN)
            if message is None:
                channel.flush()
                return followed
            if isinstance(message, KeepAlive):
                continue
            if isinstance(message, RunSpec):
                runs[message.run] = _Run(
                    dit_stage(models, world, message) if on_dit else None,
                    _decoder(models, message) if decodes else None,
                )
                followed += 1
            elif message.latents is not None:
                _process(world, runs[message.run], message, onward)
            else:
                run = runs.pop(message.run)
                if run.stage is not None and onward is not None:
                    channel.send(message, onward, Tag.DOWN)
                else:
                    channel.send(DecodedBlock(message.run, message.block), 0, Tag.FRAMES)
                if run.stage is not None:
                    run.stage.close()
    finally:
        for run in runs.values():
            if run.stage is not None:
                run.stage.close()


def _decoder(models: StageModels, spec: RunSpec) -> DecoderStage:
    if models.vae is None:
        raise ValueError("this rank holds no VAE, so it cannot decode")
    return DecoderStage(models.vae, spec.motion_latents)


def _process(world: PipelineWorld, run: _Run, work: BlockWork, onward: int | None) -> None:
    """This rank's share of one block: its steps (then on to the next rank, and the block ends here), its decode."""
    channel = world.channel
    latents = work.latents
    if run.stage is not None:
        *_, latents = run.stage.denoise(work)
        passed = run.stage.handed_on(work, latents, work.recalibrate)
        if onward is not None:
            channel.send(passed, onward, Tag.DOWN)
        channel.send(run.stage.end_block(passed), 0, Tag.REPORT)
    if run.decoder is not None:
        frames, seconds = run.decoder.decode(latents)
        channel.send(DecodedBlock(work.run, work.block, frames, seconds), 0, Tag.FRAMES)
