"""The process group of one pipeline: joined from torchrun's environment (or given by a test), torn down once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from avatars.liveavatar.distributed.channel import PeerChannel, RankFailure
from avatars.liveavatar.distributed.layout import RankLayout

__all__ = ["DEFAULT_TIMEOUT", "PipelineWorld", "launched_by_torchrun"]

# How long any receive or collective may wait before the run is declared failed (a killed peer is noticed at
# once, by its closed connection; this bounds a hung one). A follower's wait for work, between runs and within one,
# is not bounded by it (`follow._WAIT_FOR_WORK`).
DEFAULT_TIMEOUT = timedelta(seconds=300)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (which sets WORLD_SIZE and friends)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ


@dataclass
class PipelineWorld:
    """This process's place in the pipeline: its rank, the layout, the channel and the DiT ranks' group."""

    rank: int
    layout: RankLayout
    channel: PeerChannel
    dit_group: dist.ProcessGroup | None
    timeout: timedelta

    @classmethod
    def join(
        cls,
        *,
        decoder_on_last_dit: bool = False,
        timeout: timedelta = DEFAULT_TIMEOUT,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> PipelineWorld:
        """Join the process group (env:// rendezvous: torchrun's variables, or MASTER_ADDR/PORT and the given
        rank and world size). gloo for the messages; NCCL for the statistics when CUDA is present."""
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():  # one GPU per process: the model loads onto the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank or 0)))
        given = {} if rank is None else {"rank": rank, "world_size": world_size}
        dist.init_process_group(backend, timeout=timeout, **given)
        try:
            layout = RankLayout.for_world(dist.get_world_size(), decoder_on_last_dit)
            gloo = dist.new_group(backend="gloo", timeout=timeout) if torch.cuda.is_available() else None
            # Every rank takes part in creating a group, members or not.
            dit_group = dist.new_group(list(range(layout.dit_ranks)), timeout=timeout)
        except BaseException:
            dist.destroy_process_group()
            raise
        me = dist.get_rank()
        return cls(me, layout, PeerChannel(me, gloo), dit_group if me < layout.dit_ranks else None, timeout)

    @property
    def is_lead(self) -> bool:
        return self.rank == 0

    def sum_statistics(self, tensors: list[torch.Tensor]) -> None:
        """All-reduce (sum) over the DiT ranks, in place: the `statistics_reducer` of their sessions."""
        try:
            for tensor in tensors:
                dist.all_reduce(tensor, group=self.dit_group)
        except RuntimeError as err:
            raise RankFailure(
                f"rank {self.rank}: a DiT rank did not join the statistics all-reduce: {str(err).splitlines()[0]}"
            ) from err

    def close(self) -> None:
        """Leave the group. After a failure the peers may be gone, so nothing here waits on them."""
        if dist.is_initialized():
            dist.destroy_process_group()
