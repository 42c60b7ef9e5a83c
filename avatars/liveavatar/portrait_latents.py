"""The portrait's VAE latents (reference frame and motion context), encoded once per portrait and size, and the
VAE decoder warmed up on them.

The motion context is a 365-frame still video (the official single-GPU recipe), the costliest encode of a run.
Compare mode starts two runs on the same fitted portrait, and a user often regenerates with the same one, so the
pipeline keeps the latents of the last few portraits, keyed by the fitted pixels (bytes and size).

Every run's decoder is warmed up on the last motion latents before its first frame (`streaming.decoding`): a
decode of 19 latent frames that depends on nothing but the latents and the warm-up mode. The first run on a
portrait keeps a copy of its warmed causal cache with the latents, in host memory (1.19 GiB at 704×384, so none
of the GPU's); a later run on the same portrait starts from a copy of it instead, with the same frames. On the
tiny model on CPU that is about half of a short run's time; on a GPU, copying 1.19 GiB to the device against
decoding 76 frames at 704×384 is expected to be a clear gain, not measured.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from avatars.liveavatar.encoders.vae import DecoderState, WanVAE

CACHED_PORTRAITS = (
    2  # compare mode needs one; a second keeps the previous portrait when the user switches back
)


@dataclass(frozen=True)
class PortraitLatents:
    """Both encodes of one fitted portrait, and host copies of the decoder warmed up on them by warm-up mode
    (`PortraitLatentCache.warmed_decoder`). Shared between runs: callers must not write into the tensors."""

    reference: torch.Tensor  # [1, z, 1, h, w]
    motion: torch.Tensor  # [1, z, 92, h, w]
    warmed: dict[str, DecoderState] = field(default_factory=dict, compare=False, repr=False)


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

    def warmed_decoder(
        self, latents: PortraitLatents, warmup: str, device: torch.device
    ) -> DecoderState | None:
        """A copy on `device` of the decoder a run warmed up on `latents` with `warmup`; None before one has."""
        with self._lock:
            state = latents.warmed.get(warmup)
        return None if state is None else state.copy_to(device)

    def keep_warmed_decoder(self, latents: PortraitLatents, warmup: str, state: DecoderState) -> None:
        """Keep `state`, a host copy of a decoder just warmed up on `latents` with `warmup` (the first kept stays)."""
        with self._lock:
            latents.warmed.setdefault(warmup, state)
