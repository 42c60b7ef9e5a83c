"""The portrait's VAE latents (reference frame and motion context), encoded once per portrait and size.

The motion context is a 365-frame still video (the official single-GPU recipe), the costliest encode of a run.
Compare mode starts two runs on the same fitted portrait, and a user often regenerates with the same one, so the
pipeline keeps the latents of the last few portraits, keyed by the fitted pixels (bytes and size).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from avatars.liveavatar.encoders.vae import WanVAE

CACHED_PORTRAITS = (
    2  # compare mode needs one; a second keeps the previous portrait when the user switches back
)


@dataclass(frozen=True)
class PortraitLatents:
    """Both encodes of one fitted portrait. Shared between runs: callers must not write into them."""

    reference: torch.Tensor  # [1, z, 1, h, w]
    motion: torch.Tensor  # [1, z, 92, h, w]


class PortraitLatentCache:
    """A small LRU of `PortraitLatents`, safe to use from several threads."""

    def __init__(self, vae: WanVAE, capacity: int = CACHED_PORTRAITS) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._vae = vae
        self._capacity = capacity
        self._entries: OrderedDict[tuple, PortraitLatents] = OrderedDict()
        self._lock = threading.Lock()
        self.encodes = 0  # how many portraits were actually encoded

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, fitted: np.ndarray) -> PortraitLatents:
        """The latents of this fitted uint8 portrait [H, W, 3], encoding it on a miss."""
        key = (fitted.shape, hashlib.sha256(np.ascontiguousarray(fitted).tobytes()).digest())
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            # Encoding under the lock: two runs asking for the same portrait wait for one encode.
            latents = PortraitLatents(self._vae.encode_reference(fitted), self._vae.encode_motion(fitted))
            self.encodes += 1
            self._entries[key] = latents
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
            return latents
