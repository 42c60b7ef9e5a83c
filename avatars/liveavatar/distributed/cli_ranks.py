"""The CLI under torchrun: rank 0 loads the whole pipeline, reads the inputs, leads the run and writes the files;
every other rank loads its stage's models (`stage_models`) and follows."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from avatars.liveavatar.compiled import set_compiled_dit
from avatars.liveavatar.distributed.channel import RankFailure
from avatars.liveavatar.distributed.follow import follow_runs
from avatars.liveavatar.distributed.lead import PipelineLead
from avatars.liveavatar.distributed.stage_models import StageModels, load_stage_models
from avatars.liveavatar.distributed.world import PipelineWorld
from avatars.liveavatar.loading import load_pipeline
from avatars.liveavatar.pipeline import LiveAvatarPipeline

__all__ = ["run_on_ranks"]


def run_on_ranks(
    args: argparse.Namespace, pipeline: LiveAvatarPipeline | None, run: Callable[..., dict]
) -> dict | None:
    """`run(args, pipeline, stream=...)` on rank 0 with the pipeline behind `stream`: its report there, None on
    the other ranks. A failed rank raises `RankFailure` on rank 0 (and on the ranks that waited for it)."""
    world = PipelineWorld.join(decoder_on_last_dit=args.decoder_on_last_dit)
    try:
        if not world.is_lead:
            if pipeline is not None:
                models = StageModels.of_pipeline(pipeline)
            else:
                models = load_stage_models(args.model, world.layout, world.rank, fp8=args.fp8)
            if args.compile and models.dit is not None:  # rank 0's `run` compiles its own pipeline
                set_compiled_dit(models.dit)
            follow_runs(models, world)
            return None
        pipeline = pipeline or load_pipeline(args.model, fp8=args.fp8)
        lead = PipelineLead(pipeline, world)
        try:
            report = run(args, pipeline, stream=lead.stream)
        except RankFailure:
            raise  # the other ranks are ending on their own; telling them would wait on a dead one
        except BaseException:
            lead.shutdown()
            raise
        lead.shutdown()
        layout = world.layout
        report["pipeline"] = {
            "processes": layout.world_size,
            "dit_ranks": layout.dit_ranks,
            "decoder_rank": layout.decoder_rank,
        }
        return report
    finally:
        world.close()
