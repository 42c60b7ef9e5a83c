"""The CLI under torchrun: rank 0 loads the whole pipeline, reads the inputs, leads the run and writes the files;
every other rank loads its stage's models (`stage_models`) and follows."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from avatars.base import AvatarBackend
from avatars.liveavatar.compiled import set_compiled_dit, set_compiled_regions
from avatars.liveavatar.distributed.follow import follow_runs
from avatars.liveavatar.distributed.lead import PipelineLead
from avatars.liveavatar.distributed.stage_models import StageModels, load_stage_models
from avatars.liveavatar.distributed.world import PipelineWorld
from avatars.liveavatar.loading import load_pipeline
from avatars.liveavatar.pipeline import LiveAvatarPipeline

__all__ = ["run_on_ranks"]


def run_on_ranks(
    args: argparse.Namespace,
    pipeline: LiveAvatarPipeline | None,
    run: Callable[[argparse.Namespace, AvatarBackend], dict],
) -> dict | None:
    """`run(args, lead)` on rank 0, the pipeline of ranks behind `lead`: its report there, None on the other
    ranks. A failed rank raises `RankFailure` on rank 0 (and on the ranks that waited for it)."""
    world = PipelineWorld.join(decoder_on_last_dit=args.decoder_on_last_dit)
    try:
        if not world.is_lead:
            if pipeline is not None:
                models = StageModels.of_pipeline(pipeline)
            else:
                models = load_stage_models(args.model, world.layout, world.rank, fp8=args.fp8)
            if args.compile and models.dit is not None:
                set_compiled_dit(models.dit)
            follow_runs(models, world)
            return None
        pipeline = pipeline or load_pipeline(args.model, fp8=args.fp8, audio_fp32=args.audio_fp32)
        if args.compile:
            set_compiled_regions(pipeline)
        lead = PipelineLead(pipeline, world)
        try:
            report = run(args, lead)
        finally:
            lead.close()  # after a rank failure it tells no one: the other ranks end on their own
        layout = world.layout
        report["pipeline"] = {
            "processes": layout.world_size,
            "dit_ranks": layout.dit_ranks,
            "decoder_rank": layout.decoder_rank,
        }
        return report
    finally:
        world.close()
