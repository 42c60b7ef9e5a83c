"""The app under torchrun: `torchrun --standalone --nproc-per-node K app.py`.

Rank 0 loads the whole pipeline, serves Gradio and leads every run over the ranks (`PipelineLead`); every other
rank loads its stage's models of the same model (`load_stage_models`) and follows rank 0's runs (`follow_runs`)
until rank 0 shuts the pipeline down. The ranks are laid out as for the
CLI (`RankLayout`); `ISPA_DECODER_ON_LAST_DIT=1` puts the decoder on the last DiT rank. Generation runs one
request at a time (the pool is one slot); compare mode's two runs take turns on the pipeline.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from app.main import build_demo, serve
from app.models import MODEL_LABELS, REAL_MODEL, default_model, serve_only, wants_fp8
from avatars.liveavatar.distributed import (
    PipelineLead,
    PipelineWorld,
    RankFailure,
    follow_runs,
    load_stage_models,
)
from avatars.liveavatar.loading import load_pipeline

__all__ = ["DECODER_ON_LAST_DIT_ENV", "serve_on_ranks"]

DECODER_ON_LAST_DIT_ENV = "ISPA_DECODER_ON_LAST_DIT"

logger = logging.getLogger(__name__)


def serve_on_ranks(**launch_kwargs: Any) -> int:
    """This rank's part: serve (rank 0) or follow (the others) until the app stops; the exit status."""
    world = PipelineWorld.join(decoder_on_last_dit=os.environ.get(DECODER_ON_LAST_DIT_ENV, "") == "1")
    try:
        model = default_model()
        fp8 = model == REAL_MODEL and wants_fp8()
        if not world.is_lead:
            follow_runs(load_stage_models(model, world.layout, world.rank, fp8=fp8), world)
            return 0
        lead = PipelineLead(load_pipeline(model, fp8=fp8), world)  # on the GPU `join` made current
        processes = world.layout.world_size
        serve_only(model, lead, f"this server runs {MODEL_LABELS[model]} alone, on its {processes} processes")
        # torchrun stops its workers with SIGTERM: let Gradio close and the other ranks hear the shutdown.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            logger.info("serving %s", lead.label)
            serve(build_demo(), **launch_kwargs)
        finally:
            lead.close()
        return 0
    except RankFailure as err:
        logger.error("the pipeline stopped: %s", err)
        return 1
    finally:
        world.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
