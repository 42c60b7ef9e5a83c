"""Per-layer KV storage: a persistent sink plus bounded rings of whole-block history slots.

One `KVLayer` per self-attention layer (today's storage: `SinkRingLayer`), collected in a `KVCache` (the shape of transformers' per-layer cache
objects). History lives in rings written in place, one block slot at a time, with explicit counters: no shift-copy per
step, and a ring grows by one slot only while it fills (at most `history_blocks - 1` growth copies per ring). A layer can be switched local (ISPA's L-layers): its ring storage
is dropped so the allocator gets the bytes back, and only the sink remains.

Write-after-read: the caller attends to a ring's history first and appends the current block afterwards, so the
current block's keys come from the caller (the "local" keys), not from the ring. A ring of `history_blocks` slots
therefore reproduces an attention window of `history_blocks + 1` blocks. LiveAvatar's official loop stores the
current block in the ring before attending (a 4-block ring for a 4-block window); we store 3 and save a quarter of
the ring memory with identical attention.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ispa.checks import check_positive_int

__all__ = ["CacheLayout", "KVCache", "KVLayer", "KVLayerFactory", "SinkRingLayer"]


@dataclass(frozen=True)
class CacheLayout:
    """How history is stored: `num_rings` rings of `history_blocks` whole blocks of `block_tokens` tokens.

    LiveAvatar: block_tokens=3168 (3 latent frames of 1056 tokens), history_blocks=3, num_rings=4 (one ring per
    denoising step), frames_per_block=3.
    """

    block_tokens: int
    history_blocks: int
    num_rings: int = 1
    frames_per_block: int = 1

    def __post_init__(self) -> None:
        for name in ("block_tokens", "history_blocks", "num_rings", "frames_per_block"):
            check_positive_int(getattr(self, name), f"CacheLayout.{name}")

    @property
    def history_tokens(self) -> int:
        """Tokens one full ring holds."""
        return self.history_blocks * self.block_tokens


@dataclass(frozen=True)
class _TokenSpec:
    """Batch, heads, head_dim, dtype and device, fixed by the first tensor a layer stores."""

    batch: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, x: Tensor) -> _TokenSpec:
        return cls(x.shape[0], x.shape[2], x.shape[3], x.dtype, x.device)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's key plus value."""
        return 2 * self.batch * self.heads * self.head_dim * self.dtype.itemsize

    def empty(self, tokens: int) -> Tensor:
        return torch.empty(
            (self.batch, tokens, self.heads, self.head_dim), dtype=self.dtype, device=self.device
        )


class KVLayer(ABC):
    """One layer's KV storage: the contract `AttentionSession` relies on.

    A storage (bf16 rings today; quantized or offloaded ones later) plugs in by subclassing this and passing a
    factory to `KVCache` / `AttentionSession`. Every method below is called by the session; a subclass may store
    tensors however it likes as long as `sink()` and `history()` return what attention should see.
    """

    def __init__(self, layout: CacheLayout) -> None:
        self.layout = layout
        self.is_local = False  # a local layer keeps no history (ISPA's L-layers)

    # ---- sink
    @abstractmethod
    def write_sink(self, k: Tensor, v: Tensor) -> None:
        """Store exactly these sink tokens [B, S, H, D]; writing again replaces them."""

    @abstractmethod
    def sink(self) -> tuple[Tensor, Tensor]:
        """The stored sink (k, v), [B, S, H, D]; raises RuntimeError before `write_sink`."""

    # ---- history
    @abstractmethod
    def history(self, ring: int) -> tuple[Tensor, Tensor]:
        """The valid history of `ring` as attention sees it, [B, n, H, D] (n may be 0)."""

    @abstractmethod
    def append(self, ring: int, k: Tensor, v: Tensor) -> None:
        """Keep one block [B, block_tokens, H, D] as the newest history of `ring` (after it was attended to)."""

    @abstractmethod
    def filled_blocks(self, ring: int) -> int:
        """Whole blocks of valid history in `ring`."""

    # ---- local / full switch
    @abstractmethod
    def make_local(self) -> None:
        """Release all history for good; from now on the layer holds only its sink."""

    @abstractmethod
    def make_full(self) -> None:
        """Keep history again, starting empty (ISPA's recalibration)."""

    # ---- bookkeeping
    @property
    @abstractmethod
    def bytes_per_token(self) -> int | None:
        """Bytes one history token (key + value) occupies in this storage; None before any tensor was seen."""

    def ring_nbytes(self, blocks: int) -> int:
        """Bytes one ring holding `blocks` blocks occupies in this storage (0 before any tensor was seen). A storage
        whose blocks do not all cost the same (a residual window) overrides this."""
        return (self.bytes_per_token or 0) * self.layout.block_tokens * blocks

    @abstractmethod
    def sink_nbytes(self) -> int:
        """Bytes of the sink tensors held right now."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of all the tensors this layer holds right now (sink, history, and any scales)."""

    @abstractmethod
    def reset(self) -> None:
        """Drop everything, as if newly built."""


KVLayerFactory = Callable[[CacheLayout], KVLayer]


class SinkRingLayer(KVLayer):
    """Sink tokens written once, plus `num_rings` rings of up to `history_blocks` block slots.

    Slots are allocated lazily: a ring holds exactly the blocks written to it so far (at most `history_blocks`),
    so memory follows the history actually held and a warmup shorter than the ring holds less at the absorb.
    """

    def __init__(self, layout: CacheLayout) -> None:
        super().__init__(layout)
        self.reset()

    def reset(self) -> None:
        self.is_local = False
        self._spec: _TokenSpec | None = None
        self._sink_k: Tensor | None = None
        self._sink_v: Tensor | None = None
        self._ring_k: list[Tensor | None] = [None] * self.layout.num_rings
        self._ring_v: list[Tensor | None] = [None] * self.layout.num_rings
        self._filled = [0] * self.layout.num_rings  # valid block slots; they are always slots [0, filled)
        self._next_slot = [0] * self.layout.num_rings

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int | None:
        """Bytes of one stored token (key + value), known once the layer has seen a tensor."""
        return None if self._spec is None else self._spec.bytes_per_token

    def filled_blocks(self, ring: int) -> int:
        """Whole blocks of valid history in `ring`."""
        self._check_ring(ring)
        return self._filled[ring]

    def sink_nbytes(self) -> int:
        return sum(t.nbytes for t in (self._sink_k, self._sink_v) if t is not None)

    def nbytes(self) -> int:
        rings = [t for t in (*self._ring_k, *self._ring_v) if t is not None]
        return self.sink_nbytes() + sum(t.nbytes for t in rings)

    def _check_ring(self, ring: int) -> None:
        if not 0 <= ring < self.layout.num_rings:
            raise ValueError(f"ring must be in [0, {self.layout.num_rings}), got {ring}")

    def _adopt_spec(self, k: Tensor, v: Tensor, label: str) -> _TokenSpec:
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError(
                f"{label} k and v must both be [B, L, H, D], got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if k.dtype != v.dtype or k.device != v.device:
            raise ValueError(f"{label} k and v must share dtype and device")
        spec = _TokenSpec.of(k)
        if self._spec is None:
            self._spec = spec
        elif spec != self._spec:
            raise ValueError(
                f"{label} tensors {spec} do not match what this layer already stores: {self._spec}"
            )
        return spec

    # ---- sink --------------------------------------------------------------------------------------------------
    def write_sink(self, k: Tensor, v: Tensor) -> None:
        """Store exactly these sink tokens (copied). Writing again replaces them, in place when the size matches."""
        spec = self._adopt_spec(k, v, "sink")
        if k.shape[1] == 0:
            raise ValueError("the sink must hold at least one token")
        if self._sink_k is None or self._sink_k.shape != k.shape:
            self._sink_k, self._sink_v = spec.empty(k.shape[1]), spec.empty(k.shape[1])
        self._sink_k.copy_(k)
        self._sink_v.copy_(v)

    def sink(self) -> tuple[Tensor, Tensor]:
        """The stored sink (k, v), [B, S, H, D]. Callers must not write into them."""
        if self._sink_k is None or self._sink_v is None:
            raise RuntimeError("no sink has been written to this layer")
        return self._sink_k, self._sink_v

    # ---- history -----------------------------------------------------------------------------------------------
    def history(self, ring: int) -> tuple[Tensor, Tensor]:
        """Views of the valid history of `ring`, [B, n, H, D] with n = filled slots x block_tokens (maybe 0)."""
        self._check_ring(ring)
        ring_k, ring_v = self._ring_k[ring], self._ring_v[ring]
        if ring_k is None or ring_v is None:
            if self._spec is None:
                empty = torch.empty((0, 0, 0, 0))
                return empty, empty
            return self._spec.empty(0), self._spec.empty(0)
        tokens = self._filled[ring] * self.layout.block_tokens
        return ring_k[:, :tokens], ring_v[:, :tokens]

    def append(self, ring: int, k: Tensor, v: Tensor) -> None:
        """Write one block into the oldest slot of `ring` (call after attending to that ring's history)."""
        self._check_ring(ring)
        if self.is_local:
            raise RuntimeError("this layer is local: it keeps no history")
        spec = self._adopt_spec(k, v, "block")
        if k.shape[1] != self.layout.block_tokens:
            raise ValueError(f"a block must have {self.layout.block_tokens} tokens, got {k.shape[1]}")
        slot = self._next_slot[ring]
        self._store_block(ring, slot, k, v, spec)
        self._next_slot[ring] = (slot + 1) % self.layout.history_blocks
        self._filled[ring] = min(self._filled[ring] + 1, self.layout.history_blocks)

    def _store_block(self, ring: int, slot: int, k: Tensor, v: Tensor, spec: _TokenSpec) -> None:
        """Keep block (k, v) in `slot` of `ring`; how is the storage's business (here: a copy into the ring)."""
        self._ensure_slot(ring, slot, spec)
        span = slice(slot * self.layout.block_tokens, (slot + 1) * self.layout.block_tokens)
        self._ring_k[ring][:, span].copy_(k)
        self._ring_v[ring][:, span].copy_(v)

    def _ensure_slot(self, ring: int, slot: int, spec: _TokenSpec) -> None:
        """Grow `ring` to hold `slot` the first time it is written (slots fill in order, so it grows by one block).

        The ring stays one contiguous tensor, so `history` returns views with no copy per forward; the growth copy
        happens at most `history_blocks - 1` times per ring and briefly holds the old and the new ring together.
        """
        held = self._filled[ring]
        if slot < held:
            return
        tokens = (held + 1) * self.layout.block_tokens
        grown_k, grown_v = spec.empty(tokens), spec.empty(tokens)
        if held:
            kept = held * self.layout.block_tokens
            grown_k[:, :kept].copy_(self._ring_k[ring])
            grown_v[:, :kept].copy_(self._ring_v[ring])
        self._ring_k[ring], self._ring_v[ring] = grown_k, grown_v

    # ---- local / full switch -----------------------------------------------------------------------------------
    def make_local(self) -> None:
        """Release all ring storage for good; from now on the layer holds only its sink."""
        self.is_local = True
        self._drop_rings()

    def make_full(self) -> None:
        """Store history again (rings start empty), e.g. when ISPA recalibrates."""
        self.is_local = False
        self._drop_rings()

    def _drop_rings(self) -> None:
        # Rebinding to None drops the only references, so the allocator gets the memory back.
        self._ring_k = [None] * self.layout.num_rings
        self._ring_v = [None] * self.layout.num_rings
        self._filled = [0] * self.layout.num_rings
        self._next_slot = [0] * self.layout.num_rings


class KVCache:
    """All layers' storage, one `KVLayer` per self-attention layer, each built by `layer_factory(layout)`."""

    def __init__(
        self, num_layers: int, layout: CacheLayout, layer_factory: KVLayerFactory = SinkRingLayer
    ) -> None:
        check_positive_int(num_layers, "num_layers")
        self.layout = layout
        self.layers: list[KVLayer] = []
        for _ in range(num_layers):
            layer = layer_factory(layout)
            if not isinstance(layer, KVLayer):
                raise ValueError(f"layer_factory must build KVLayer objects, got {type(layer).__name__}")
            self.layers.append(layer)

    def __len__(self) -> int:
        return len(self.layers)

    def nbytes_per_layer(self) -> list[int]:
        return [layer.nbytes() for layer in self.layers]

    def nbytes(self) -> int:
        return sum(self.nbytes_per_layer())

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
