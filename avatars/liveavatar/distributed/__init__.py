"""LiveAvatar on several processes (GPUs): the timestep pipeline on torch.distributed (see `avatars.liveavatar.rank_layout`)."""

from avatars.liveavatar.distributed.channel import RankFailure
from avatars.liveavatar.distributed.cli_ranks import run_on_ranks
from avatars.liveavatar.distributed.follow import follow_runs
from avatars.liveavatar.distributed.lead import PipelineLead
from avatars.liveavatar.distributed.stage_models import StageModels, load_stage_models
from avatars.liveavatar.distributed.world import DEFAULT_TIMEOUT, PipelineWorld, launched_by_torchrun

__all__ = [
    "DEFAULT_TIMEOUT",
    "PipelineLead",
    "PipelineWorld",
    "RankFailure",
    "StageModels",
    "follow_runs",
    "launched_by_torchrun",
    "load_stage_models",
    "run_on_ranks",
]
