"""The process group of one pipeline: joined from torchrun's environment (or given by a test), torn down once.

On GPUs the default group is NCCL, bound to this process's GPU at `init_process_group(device_id=…)` so its
communicator is made at join; the DiT ranks' group (the ISPA statistics) runs one tiny all-reduce at join for the
same reason, so no communicator is made inside a run's first absorb. Control messages use a gloo group of their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from avatars.liveavatar.distributed.channel import PeerChannel, RankFailure
from avatars.liveavatar.rank_layout import RankLayout

__all__ = ["DEFAULT_TIMEOUT", "PipelineWorld", "launched_by_torchrun", "sum_flattened"]

# How long any receive or collective may wait before the run is declared failed (a killed peer is noticed at
# once, by its closed connection; this bounds a hung one). A follower waits for work as long between keep-alives
# from upstream, which the lead sends while it has nothing else to send (`lead.KeepAlive`).
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
        rank and world size)."""
        device = None
        if torch.cuda.is_available():  # one GPU per process: the model loads onto the current device
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank or 0)))
            torch.cuda.set_device(device)
        given = {} if rank is None else {"rank": rank, "world_size": world_size}
        backend = "nccl" if device is not None else "gloo"
        dist.init_process_group(backend, timeout=timeout, device_id=device, **given)
        try:
            layout = RankLayout.for_world(dist.get_world_size(), decoder_on_last_dit)
            control = dist.new_group(backend="gloo", timeout=timeout) if device is not None else None
            # Every rank takes part in creating a group, members or not.
            dit_group = dist.new_group(list(range(layout.dit_ranks)), timeout=timeout)
            me = dist.get_rank()
            if me < layout.dit_ranks:
                dist.all_reduce(torch.zeros(1, device=device or "cpu"), group=dit_group)
        except BaseException:
            dist.destroy_process_group()
            raise
        channel = PeerChannel(me, control, tensor_group=None, tensor_device=device or torch.device("cpu"))
        return cls(me, layout, channel, dit_group if me < layout.dit_ranks else None, timeout)

    @property
    def is_lead(self) -> bool:
        return self.rank == 0

    def sum_statistics(self, tensors: list[torch.Tensor]) -> None:
        """All-reduce (sum) over the DiT ranks, in place: the `statistics_reducer` of their sessions."""

        def all_reduce(buffer: torch.Tensor) -> None:
            try:
                dist.all_reduce(buffer, group=self.dit_group)
            except RuntimeError as err:
                raise RankFailure(
                    f"rank {self.rank}: a DiT rank did not join the statistics all-reduce: "
                    f"{str(err).splitlines()[0]}"
                ) from err

        sum_flattened(tensors, all_reduce)

    def close(self) -> None:
        """Leave the group. After a failure the peers may be gone, so nothing here waits on them."""
        if dist.is_initialized():
            dist.destroy_process_group()


def sum_flattened(tensors: list[torch.Tensor], all_reduce) -> None:
    """Sum `tensors` in place with one `all_reduce(buffer)` per dtype and device, over their flattened
    concatenation (an absorb reduces ~100 tensors; one collective each would pay ~100 latencies)."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for members in groups.values():
        buffer = torch.cat([t.reshape(-1) for t in members])
        all_reduce(buffer)
        offset = 0
        for tensor in members:
            tensor.copy_(buffer[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
