"""Point-to-point messages between the pipeline's ranks on torch.distributed, with failures made readable.

A message is any picklable object (tensors in it must be on the CPU); it travels as two tensors, its length and
its pickle, with `isend`/`irecv` on a gloo group. Sends never wait: gloo completes a send only once the receiver
has posted the matching receive, so waiting on one could deadlock the pipeline; their buffers are kept until done.
Each kind of message has its own tag, so a receiver takes the kind it needs whatever else is queued, and
`recv_run` takes the next one of a given run, keeping those of other runs (in order) for their own receives.
A receive that fails (peer gone, or nothing within the group's timeout) raises `RankFailure` naming the peer.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from datetime import timedelta
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["PeerChannel", "RankFailure", "Tag"]


class RankFailure(RuntimeError):
    """Another rank of the pipeline stopped answering (it crashed, was killed, or hung past the timeout)."""


class Tag(IntEnum):
    DOWN = 1  # DiT rank r → r+1 → … → decoder: a run's spec, its blocks and its end, or the shutdown
    REPORT = 2  # DiT ranks → rank 0: their part of a block's engine report
    FRAMES = 3  # decoder → rank 0: a block's video frames
    REFERENCE = 4  # last DiT rank → the others: block 0's first latent frame, for the sink refresh


class PeerChannel:
    """Messages to and from the other ranks of `group` (global rank numbers)."""

    def __init__(self, rank: int, group: dist.ProcessGroup | None = None) -> None:
        self.rank = rank
        self.group = group
        self._in_flight: list[tuple[dist.Work, torch.Tensor]] = []
        self._kept: defaultdict[tuple[int, Tag], list[Any]] = defaultdict(list)  # other runs' messages

    def send(self, message: Any, dst: int, tag: Tag) -> None:
        payload = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8)
        length = torch.tensor([payload.numel()], dtype=torch.int64)
        self._in_flight = [(work, t) for work, t in self._in_flight if not work.is_completed()]
        for tensor in (length, payload):
            try:
                work = dist.isend(tensor, dst, group=self.group, tag=int(tag))
            except RuntimeError as err:
                raise RankFailure(
                    f"rank {dst} stopped answering rank {self.rank} (sending it a {tag.name.lower()} message): "
                    f"{_first_line(err)}"
                ) from err
            self._in_flight.append((work, tensor))

    def recv(self, src: int, tag: Tag, timeout: timedelta | None = None) -> Any:
        """The next `tag` message from `src`; `timeout` overrides the group's (e.g. to wait long for work)."""
        length = torch.empty(1, dtype=torch.int64)
        self._wait(dist.irecv(length, src, group=self.group, tag=int(tag)), src, tag, timeout)
        payload = torch.empty(int(length.item()), dtype=torch.uint8)
        self._wait(dist.irecv(payload, src, group=self.group, tag=int(tag)), src, tag, None)
        return pickle.loads(payload.numpy().tobytes())

    def recv_run(self, src: int, tag: Tag, run: int) -> Any:
        """The next `tag` message from `src` of run `run` (a message with a `run` field). Messages of other
        runs that arrive first are kept, in order, for their own `recv_run`."""
        kept = self._kept[(src, tag)]
        for i, message in enumerate(kept):
            if message.run == run:
                return kept.pop(i)
        while True:
            message = self.recv(src, tag)
            if message.run == run:
                return message
            kept.append(message)

    def flush(self) -> None:
        """Wait until every message sent has been received (at the end of a run, when all of them will be)."""
        for work, _ in self._in_flight:
            try:
                work.wait()
            except RuntimeError as err:
                raise RankFailure(
                    f"rank {self.rank}: a message was never received: {_first_line(err)}"
                ) from err
        self._in_flight.clear()

    def _wait(self, work: dist.Work, src: int, tag: Tag, timeout: timedelta | None) -> None:
        try:
            if timeout is None:
                work.wait()
            else:
                work.wait(timeout)
        except RuntimeError as err:
            raise RankFailure(
                f"rank {src} stopped answering rank {self.rank} (waiting for {tag.name.lower()}): "
                f"{_first_line(err)}"
            ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
