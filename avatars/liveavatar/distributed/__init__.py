"""LiveAvatar on several processes (GPUs): the timestep pipeline on torch.distributed (see `layout`)."""

from avatars.liveavatar.distributed.channel import RankFailure
from avatars.liveavatar.distributed.cli_ranks import run_on_ranks
from avatars.liveavatar.distributed.follow import follow_runs
from avatars.liveavatar.distributed.layout import RankLayout
from avatars.liveavatar.distributed.lead import PipelineLead
from avatars.liveavatar.distributed.world import DEFAULT_TIMEOUT, PipelineWorld, launched_by_torchrun

__all__ = [
    "DEFAULT_TIMEOUT",
    "PipelineLead",
    "PipelineWorld",
    "RankFailure",
    "RankLayout",
    "follow_runs",
    "launched_by_torchrun",
    "run_on_ranks",
]
