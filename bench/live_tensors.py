"""The peak of live tensor bytes over a piece of code, counted from the tensors themselves (on any device, `meta`
included): what `torch.cuda.max_memory_allocated` would add for it, without allocator rounding, fragmentation or
kernels' own workspaces.

Every tensor an operator returns inside `LiveTensorPeak` is counted once per storage (views share their base's)
until the last tensor holding that storage is gone. Tensors that existed before (weights, inputs) are not counted,
so the peak is what the code allocates on top of them, unless they are handed to `hold` first: then they count
from the start and stop counting when the code drops them (a cache the code replaces as it goes).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorPeak"]


class LiveTensorPeak(TorchDispatchMode):
    """`with LiveTensorPeak() as live: ...`; then `live.peak` (bytes), `live.live` (bytes still held) and
    `live.largest` (the largest single storage seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._storages: dict[int, list] = {}  # storage key -> [nbytes, number of tensors alive that hold it]

    def hold(self, tensors) -> None:
        """Count these existing tensors as live from now on, until they are dropped; `peak` includes them."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        self.peak = max(self.peak, self.live)

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        nbytes = storage.nbytes()
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [nbytes, 0]
            self.live += nbytes
        elif nbytes > entry[0]:  # an out= operator grew it
            self.live += nbytes - entry[0]
            entry[0] = nbytes
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)
        self.largest = max(self.largest, entry[0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        self.peak = max(self.peak, self.live)
        return out
