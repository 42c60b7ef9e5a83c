"""Messages between the pipeline's ranks on torch.distributed, with failures made readable.

A message is a record (a dataclass, or None). Its control part travels pickled on a gloo group: two tensors, its
length and its pickle, with `isend`/`irecv`. On the tags that carry bulk data (`BULK_TAGS`: the blocks down the
pipeline and the frames back) every tensor in the record is taken out before pickling, packed into one byte buffer
and sent as a tensor on the tensor group (NCCL between GPUs, gloo on the CPU), in the pickled header's place:
latents, audio tokens, a run's spec and the frames never pass through pickle or host memory on GPUs. Each directed
pair of ranks carries bulk data under one tag only (DiT rank r → r+1 → … → the decoder, and the decoder → rank 0),
so the tensor sends between two ranks are received in the order they were sent, as NCCL requires (it has no tags).
Other records (reports, the sink-refresh reference) are small and travel pickled, their tensors on the CPU.

Sends never wait: gloo completes a send only once the receiver has posted the matching receive, so waiting on one
could deadlock the pipeline; their buffers are kept until done. Each kind of message has its own tag, so a receiver
takes the kind it needs whatever else is queued, and `recv_run` takes the next one of a given run, keeping those of
other runs (in order) for their own receives. A receive that fails (peer gone, or nothing within the timeout)
raises `RankFailure` naming the peer.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading
import time
from collections import defaultdict
from datetime import timedelta
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

from avatars.base import BackendFailure

__all__ = ["BULK_TAGS", "PeerChannel", "RankFailure", "Tag", "pack_tensors", "unpack_tensors"]

_ALIGN = 16  # bytes: every packed tensor starts at a multiple, so it can be viewed as its dtype in place


class RankFailure(BackendFailure):
    """Another rank of the pipeline stopped answering (it crashed, was killed, or hung past the timeout)."""


class Tag(IntEnum):
    DOWN = (
        1  # DiT rank r → r+1 → … → decoder: a run's spec, its blocks and its end, keep-alives, the shutdown
    )
    REPORT = 2  # DiT ranks → rank 0: their part of a block's engine report
    FRAMES = 3  # decoder → rank 0: a block's video frames
    REFERENCE = 4  # last DiT rank → the others: block 0's first latent frame, for the sink refresh


BULK_TAGS = frozenset({Tag.DOWN, Tag.FRAMES})


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where a tensor taken out of a message lies in the packed buffer."""

    index: int


def pack_tensors(message: Any) -> tuple[Any, list[torch.Tensor]]:
    """(the message with each tensor replaced by a `_Slot`, the tensors in slot order). Looks inside dataclasses,
    lists, tuples (named ones too) and dicts; a part holding no tensor is kept as it is."""
    tensors: list[torch.Tensor] = []

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return _Slot(len(tensors) - 1)
        return _map_parts(value, take)

    return take(message), tensors


def unpack_tensors(message: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of `pack_tensors`."""

    def put(value: Any) -> Any:
        return tensors[value.index] if isinstance(value, _Slot) else _map_parts(value, put)

    return put(message)


def _map_parts(value: Any, apply) -> Any:
    """`value` with `apply` applied to each part, or `value` itself when no part changes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        old = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        new = {name: apply(part) for name, part in old.items()}
        changed = {name: part for name, part in new.items() if part is not old[name]}
        return dataclasses.replace(value, **changed) if changed else value
    if isinstance(value, (list, tuple)):
        parts = [apply(part) for part in value]
        if all(new is old for new, old in zip(parts, value, strict=True)):
            return value
        return type(value)(*parts) if hasattr(value, "_fields") else type(value)(parts)
    if isinstance(value, dict):
        parts = {key: apply(part) for key, part in value.items()}
        return parts if any(parts[key] is not value[key] for key in value) else value
    return value


@dataclasses.dataclass(frozen=True)
class _Bulk:
    """The pickled header of a message whose tensors follow as one byte buffer: each tensor's place in it."""

    message: Any
    layout: tuple[tuple[tuple[int, ...], torch.dtype, int], ...]  # (shape, dtype, byte offset) per tensor
    nbytes: int


def _byte_layout(
    tensors: list[torch.Tensor],
) -> tuple[tuple[tuple[tuple[int, ...], torch.dtype, int], ...], int]:
    layout, offset = [], 0
    for tensor in tensors:
        layout.append((tuple(tensor.shape), tensor.dtype, offset))
        offset += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    return tuple(layout), offset


def _pack_bytes(tensors: list[torch.Tensor], nbytes: int, layout, device: torch.device) -> torch.Tensor:
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for tensor, (_, _, offset) in zip(tensors, layout, strict=True):
        data = tensor.detach().to(device).contiguous().reshape(-1).view(torch.uint8)
        buffer[offset : offset + data.numel()].copy_(data)
    return buffer


def _unpack_bytes(buffer: torch.Tensor, layout) -> list[torch.Tensor]:
    tensors = []
    for shape, dtype, offset in layout:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        tensors.append(buffer[offset : offset + size].view(dtype).reshape(shape))
    return tensors


class PeerChannel:
    """Messages to and from the other ranks (global rank numbers): control on `group` (gloo), bulk tensors on
    `tensor_group` (NCCL on GPUs) in buffers on `tensor_device`."""

    def __init__(
        self,
        rank: int,
        group: dist.ProcessGroup | None = None,
        tensor_group: dist.ProcessGroup | None = None,
        tensor_device: torch.device | None = None,
    ) -> None:
        self.rank = rank
        self.group = group
        self.tensor_group = tensor_group
        self.tensor_device = tensor_device or torch.device("cpu")
        self._in_flight: list[tuple[dist.Work, torch.Tensor]] = []
        self._send_lock = threading.Lock()  # the lead's keep-alive thread sends too: one message at a time
        self._last_sent: dict[int, float] = {}
        self._kept: defaultdict[tuple[int, Tag], list[Any]] = defaultdict(list)  # other runs' messages

    def send(self, message: Any, dst: int, tag: Tag) -> None:
        bulk = None
        if tag in BULK_TAGS:
            header, tensors = pack_tensors(message)
            if tensors:
                layout, nbytes = _byte_layout(tensors)
                message = _Bulk(header, layout, nbytes)
                bulk = _pack_bytes(tensors, nbytes, layout, self.tensor_device)
        payload = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8)
        length = torch.tensor([payload.numel()], dtype=torch.int64)
        with self._send_lock:
            self._in_flight = [(work, t) for work, t in self._in_flight if not work.is_completed()]
            self._isend(length, dst, tag, self.group)
            self._isend(payload, dst, tag, self.group)
            if bulk is not None:
                self._isend(bulk, dst, tag, self.tensor_group)
            self._last_sent[dst] = time.monotonic()

    def seconds_since_send(self, dst: int) -> float:
        """How long ago the last message to `dst` was sent (infinite before the first)."""
        with self._send_lock:
            sent = self._last_sent.get(dst)
        return float("inf") if sent is None else time.monotonic() - sent

    def recv(self, src: int, tag: Tag, timeout: timedelta | None = None) -> Any:
        """The next `tag` message from `src`; `timeout` overrides the group's (e.g. a follower's wait for work)."""
        length = torch.empty(1, dtype=torch.int64)
        self._wait(dist.irecv(length, src, group=self.group, tag=int(tag)), src, tag, timeout)
        payload = torch.empty(int(length.item()), dtype=torch.uint8)
        self._wait(dist.irecv(payload, src, group=self.group, tag=int(tag)), src, tag, None)
        message = pickle.loads(payload.numpy().tobytes())
        if not isinstance(message, _Bulk):
            return message
        buffer = torch.empty(message.nbytes, dtype=torch.uint8, device=self.tensor_device)
        self._wait(dist.irecv(buffer, src, group=self.tensor_group, tag=int(tag)), src, tag, None)
        return unpack_tensors(message.message, _unpack_bytes(buffer, message.layout))

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
        """Wait until every message sent has been received (at the end, when all of them will be)."""
        with self._send_lock:
            in_flight, self._in_flight = self._in_flight, []
        for work, _ in in_flight:
            try:
                work.wait()
            except RuntimeError as err:
                raise RankFailure(
                    f"rank {self.rank}: a message was never received: {_first_line(err)}"
                ) from err

    def _isend(self, tensor: torch.Tensor, dst: int, tag: Tag, group: dist.ProcessGroup | None) -> None:
        try:
            work = dist.isend(tensor, dst, group=group, tag=int(tag))
        except RuntimeError as err:
            raise RankFailure(
                f"rank {dst} stopped answering rank {self.rank} (sending it a {tag.name.lower()} message): "
                f"{_first_line(err)}"
            ) from err
        self._in_flight.append((work, tensor))

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
