"""KV storage formats by name: bf16 rings, or rings whose history is stored quantized.

`kv_layer_factory("fp8")` gives the factory an `AttentionSession(kv_layer=...)` takes. A quantized layer keeps each
history block as codes plus scales (`ispa.kv_codecs`), one lazily allocated slot per block, and its sink in the
model's dtype (small, and every layer keeps it) unless the format quantizes the sink too. `history()` dequantizes the
valid slots into a buffer shared by all layers of one factory (one layer's ring of keys and values), so attention,
the LSE merge and ISPA's statistics all see exactly the same dequantized history, and no forward allocates a
history-sized tensor; a quantized sink is dequantized by `sink()` into a second shared buffer the same way.

The shared buffers mean a history (or sink) returned by one layer is valid until the next `history()` (or `sink()`)
call on any layer of the same factory: the model copies the sink into its local keys and the session attends to the
history before the next layer runs. Build one factory per session.

Formats (bytes of one history token, keys + values, at LiveAvatar-14B's 40 heads x 128):
* bf16: 20,480 (today's `SinkRingLayer`).
* fp8: e4m3 with a fp32 scale per token and head for keys and values: 10,560 (51.6 %); bf16 sink.
* fp8-all: the same, and the sink stored that way too (it then also changes what ISPA's L-layers attend to).
* int4: KIVI-style, keys per channel over groups of up to 32 tokens, values per token over groups of 32 channels,
  fp16 min and step per group: 6,400 (31.3 %); bf16 sink.
* q2: QVG-style 2 bits per value (`ispa.kv_codec_q2`): k-means smoothing, then two one-bit residual stages;
  2,716 (13.3 %), and the sink stored the same way (a bf16 sink alone would be 6.5 % of a Full bf16 cache at 14B).
* int4+w, q2+w: KIVI's residual window: the newest latent frame of each ring's newest block (the tokens just
  before the current block) stays in the model's dtype until the next block arrives, and is then quantized on
  its own. A ring of n blocks holds n heads of T - W tokens and n - 1 windows quantized, and one window raw.
The choices are measured, see `bench/kv_formats.py` and docs/engine.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import gcd

import torch
from torch import Tensor

from ispa.cache import CacheLayout, KVLayer, KVLayerFactory, SinkRingLayer, _TokenSpec
from ispa.kv_codec_q2 import Q2Codec
from ispa.kv_codecs import BlockCodec, Fp8TokenCodec, Int4Codec

__all__ = [
    "KV_FORMATS",
    "LIGHTEST_KV_FORMAT",
    "DequantizedHistory",
    "QuantizedKVFactory",
    "QuantizedRingLayer",
    "history_bytes_per_token",
    "history_ring_bytes",
    "int4_key_group",
    "kv_history_bytes_per_block",
    "kv_layer_factory",
    "quantizes_sink",
    "residual_window_tokens",
    "sink_bytes",
    "sink_bytes_per_token",
]

INT4_MAX_GROUP = 32
INT4_VALUE_GROUP = 32

CodecPair = tuple[BlockCodec, BlockCodec]


def int4_key_group(block_tokens: int, width: int) -> int:
    """Token group of int4 keys: the largest size <= 32 that tiles a block and makes whole bytes per token.

    `width` is batch x heads x head_dim; fp16 min and step per group cost 4 x width / group bytes per token.
    """
    for group in range(min(INT4_MAX_GROUP, block_tokens), 1, -1):
        if block_tokens % group == 0 and (4 * width) % group == 0:
            return group
    raise ValueError(
        f"int4 KV needs block_tokens with a divisor in [2, {INT4_MAX_GROUP}] that divides 4 x {width}; "
        f"block_tokens={block_tokens} has none"
    )


def _fp8_codecs(chunk_tokens: int, spec: _TokenSpec) -> CodecPair:
    return Fp8TokenCodec(), Fp8TokenCodec()


def _int4_codecs(chunk_tokens: int, spec: _TokenSpec) -> CodecPair:
    width = spec.batch * spec.heads * spec.head_dim
    key = Int4Codec("tokens", int4_key_group(chunk_tokens, width))
    value_group = INT4_VALUE_GROUP if spec.head_dim % INT4_VALUE_GROUP == 0 else spec.head_dim
    return key, Int4Codec("channels", value_group)


_Q2 = Q2Codec()


def _q2_codecs(chunk_tokens: int, spec: _TokenSpec) -> CodecPair:
    return _Q2, _Q2


# (tokens every stored chunk is a multiple of, shape) -> (key codec, value codec)
CodecChooser = Callable[[int, _TokenSpec], CodecPair]


@dataclass(frozen=True)
class _Format:
    """How one quantized format stores a layer: history codecs by chunk size and shape, the sink's codec (None:
    the sink stays in the model's dtype), and how many of the newest latent frames of each ring stay unquantized
    (KIVI's residual window)."""

    history: CodecChooser
    sink: BlockCodec | None = None
    window_frames: int = 0


_QUANTIZED: dict[str, _Format] = {
    "fp8": _Format(_fp8_codecs),
    "fp8-all": _Format(_fp8_codecs, sink=Fp8TokenCodec()),
    "int4": _Format(_int4_codecs),
    "int4+w": _Format(_int4_codecs, window_frames=1),
    "q2": _Format(_q2_codecs, sink=_Q2),
    "q2+w": _Format(_q2_codecs, sink=_Q2, window_frames=1),
}
KV_FORMATS = ("bf16", *_QUANTIZED)
# The format whose runs need the least memory (2-bit codes for history and sink): a model's size is offered when a
# run in it fits (checked against every format at the 14B sizes in tests/avatars/test_memory_terms.py).
LIGHTEST_KV_FORMAT = "q2"


def residual_window_tokens(kv_format: str, layout: CacheLayout) -> int:
    """Tokens of each ring's newest block that `kv_format` keeps in the model's dtype (0: none)."""
    return 0 if kv_format == "bf16" else _window_tokens(_format(kv_format), layout)


def _window_tokens(kv_format: _Format, layout: CacheLayout) -> int:
    frames = kv_format.window_frames
    if frames == 0:
        return 0
    if layout.block_tokens % layout.frames_per_block:
        raise ValueError(
            f"a residual window of whole latent frames needs block_tokens ({layout.block_tokens}) to divide by "
            f"frames_per_block ({layout.frames_per_block})"
        )
    return min(layout.block_tokens, frames * layout.block_tokens // layout.frames_per_block)


def _chunk_tokens(layout: CacheLayout, window: int) -> int:
    """The token count every stored chunk is a multiple of: the block, or with a window its head and tail."""
    return gcd(layout.block_tokens, window) if window else layout.block_tokens


def _format(kv_format: str) -> _Format:
    if kv_format not in _QUANTIZED:
        raise ValueError(f"kv_format must be one of {', '.join(KV_FORMATS)}, got {kv_format!r}")
    return _QUANTIZED[kv_format]


class DequantizedHistory:
    """One reusable key and value buffer [B, history_tokens, H, D], allocated on first use, shared by layers."""

    def __init__(self) -> None:
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self._spec: _TokenSpec | None = None

    def views(self, spec: _TokenSpec, capacity: int, tokens: int) -> tuple[Tensor, Tensor]:
        if self._k is None or self._spec != spec or self._k.shape[1] < capacity:
            self._k, self._v, self._spec = spec.empty(capacity), spec.empty(capacity), spec
        return self._k[:, :tokens], self._v[:, :tokens]

    def nbytes(self) -> int:
        return 0 if self._k is None else self._k.nbytes + self._v.nbytes


# One stored piece of a block: (tokens, key tensors, value tensors, raw); a raw piece holds the block's own tokens.
_Chunk = tuple[int, tuple[Tensor, ...], tuple[Tensor, ...], bool]


class QuantizedRingLayer(SinkRingLayer):
    """A `SinkRingLayer` whose history blocks are stored as codes plus scales, one slot per written block, whose
    sink is too when the format gives it a codec, and which keeps the newest tokens of each ring unquantized when
    the format has a residual window."""

    def __init__(
        self,
        layout: CacheLayout,
        kv_format: _Format,
        buffer: DequantizedHistory,
        sink_buffer: DequantizedHistory,
    ) -> None:
        self._format = kv_format
        self._choose_codecs = kv_format.history
        self._sink_codec = kv_format.sink
        self._window = _window_tokens(kv_format, layout)
        self._buffer = buffer
        self._sink_buffer = sink_buffer
        super().__init__(layout)

    def reset(self) -> None:
        super().reset()
        self._stored_sink: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None = None
        self._codecs: CodecPair | None = None
        self._slots: list[list[list[_Chunk]]] = [[] for _ in range(self.layout.num_rings)]
        self._newest: list[int | None] = [None] * self.layout.num_rings

    @property
    def codecs(self) -> CodecPair | None:
        """(key codec, value codec), chosen when the first block arrives."""
        return self._codecs

    @property
    def window_tokens(self) -> int:
        """Tokens of each ring's newest block kept in the model's dtype."""
        return self._window

    # ---- sink (quantized only when the format has a sink codec) --------------------------------------------
    def write_sink(self, k: Tensor, v: Tensor) -> None:
        if self._sink_codec is None:
            super().write_sink(k, v)
            return
        self._adopt_spec(k, v, "sink")
        if k.shape[1] == 0:
            raise ValueError("the sink must hold at least one token")
        self._sink_codec.check_block(k.shape[1], k.shape[-1])
        self._stored_sink = (self._sink_codec.encode(k), self._sink_codec.encode(v))
        self._sink_tokens = k.shape[1]

    def sink(self) -> tuple[Tensor, Tensor]:
        """The sink as attention sees it; a quantized sink is dequantized into the shared sink buffer (valid until
        the next `sink()` call on any layer of this factory)."""
        if self._sink_codec is None:
            return super().sink()
        if self._stored_sink is None:
            raise RuntimeError("no sink has been written to this layer")
        tokens = self._sink_tokens
        k_out, v_out = self._sink_buffer.views(self._spec, tokens, tokens)
        self._sink_codec.decode_into(self._stored_sink[0], k_out)
        self._sink_codec.decode_into(self._stored_sink[1], v_out)
        return k_out, v_out

    def sink_nbytes(self) -> int:
        if self._sink_codec is None:
            return super().sink_nbytes()
        return (
            0
            if self._stored_sink is None
            else sum(t.nbytes for t in (*self._stored_sink[0], *self._stored_sink[1]))
        )

    # ---- history -------------------------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int | None:
        """Bytes of one history token of a block stored quantized whole: codes plus its share of the scales (with
        a residual window a ring's exact bytes are `ring_nbytes`)."""
        if self._spec is None:
            return None
        codecs = self._codecs or self._choose_codecs(_chunk_tokens(self.layout, self._window), self._spec)
        return kv_history_bytes_per_block(codecs, self.layout, self._spec) // self.layout.block_tokens

    def ring_nbytes(self, blocks: int) -> int:
        if self._spec is None or blocks == 0:
            return 0
        return _ring_bytes(self._format, self.layout, self._spec, blocks)

    def nbytes(self) -> int:
        stored = [t for ring in self._slots for slot in ring for _, k, v, _ in slot for t in (*k, *v)]
        return self.sink_nbytes() + sum(t.nbytes for t in stored)

    def history(self, ring: int) -> tuple[Tensor, Tensor]:
        """The valid history of `ring`, dequantized into the shared buffer (valid until the next `history`)."""
        self._check_ring(ring)
        slots = self._slots[ring][: self._filled[ring]]
        if not slots:
            return super().history(ring)
        block = self.layout.block_tokens
        k_out, v_out = self._buffer.views(self._spec, self.layout.history_tokens, len(slots) * block)
        key_codec, value_codec = self._codecs
        for index, slot in enumerate(slots):
            start = index * block
            for tokens, k_stored, v_stored, raw in slot:
                span = slice(start, start + tokens)
                if raw:
                    k_out[:, span].copy_(k_stored[0])
                    v_out[:, span].copy_(v_stored[0])
                else:
                    key_codec.decode_into(k_stored, k_out[:, span])
                    value_codec.decode_into(v_stored, v_out[:, span])
                start = span.stop
        return k_out, v_out

    def _store_block(self, ring: int, slot: int, k: Tensor, v: Tensor, spec: _TokenSpec) -> None:
        """Quantize the block into `slot` (a new slot while the ring fills; the old slot's tensors are dropped).
        With a residual window the block's newest tokens are kept as they are, and the previous newest block's
        window is quantized now."""
        if self._codecs is None:
            self._codecs = self._choose_codecs(_chunk_tokens(self.layout, self._window), spec)
        key_codec, value_codec = self._codecs
        head = self.layout.block_tokens - self._window
        previous = self._newest[ring]
        if self._window and previous is not None and previous != slot:
            older = self._slots[ring][previous]
            tokens, k_raw, v_raw, _ = older[-1]
            older[-1] = (tokens, key_codec.encode(k_raw[0]), value_codec.encode(v_raw[0]), False)
        chunks: list[_Chunk] = []
        if head:
            chunks.append((head, key_codec.encode(k[:, :head]), value_codec.encode(v[:, :head]), False))
        if self._window:
            chunks.append((self._window, (k[:, head:].clone(),), (v[:, head:].clone(),), True))
        if slot < len(self._slots[ring]):
            self._slots[ring][slot] = chunks
        else:
            self._slots[ring].append(chunks)
        self._newest[ring] = slot

    def _drop_rings(self) -> None:
        super()._drop_rings()
        self._slots = [[] for _ in range(self.layout.num_rings)]
        self._newest = [None] * self.layout.num_rings


def kv_history_bytes_per_block(codecs: CodecPair, layout: CacheLayout, spec: _TokenSpec) -> int:
    """Bytes one stored history block (keys and values, codes plus scales) occupies."""
    shape = (spec.batch, layout.block_tokens, spec.heads, spec.head_dim)
    return codecs[0].block_nbytes(*shape) + codecs[1].block_nbytes(*shape)


class QuantizedKVFactory:
    """Builds the layers of one session in one quantized format; they share one `DequantizedHistory` for history
    and one for the sink (used only by formats that quantize the sink)."""

    def __init__(self, kv_format: str) -> None:
        self.kv_format = kv_format
        self.buffer = DequantizedHistory()
        self.sink_buffer = DequantizedHistory()
        self._format = _QUANTIZED[kv_format]

    def __call__(self, layout: CacheLayout) -> KVLayer:
        return QuantizedRingLayer(layout, self._format, self.buffer, self.sink_buffer)

    def buffer_nbytes(self) -> int:
        """Bytes of both dequantization buffers as allocated now."""
        return self.buffer.nbytes() + self.sink_buffer.nbytes()


def kv_layer_factory(kv_format: str) -> KVLayerFactory:
    """The `kv_layer` factory for a format name in `KV_FORMATS`; call once per session (quantized layers share a
    buffer within a session)."""
    if kv_format == "bf16":
        return SinkRingLayer
    _format(kv_format)
    return QuantizedKVFactory(kv_format)


def _meta_spec(batch: int, heads: int, head_dim: int, bytes_per_value: int = 2) -> _TokenSpec:
    dtype = {2: torch.bfloat16, 4: torch.float32}[bytes_per_value]
    return _TokenSpec(batch, heads, head_dim, dtype, torch.device("meta"))


def history_bytes_per_token(
    kv_format: str, layout: CacheLayout, batch: int, heads: int, head_dim: int
) -> int:
    """Bytes of one history token of a block stored quantized whole in `kv_format`, without building any tensor
    (a ring's exact bytes, residual window included, are `history_ring_bytes`)."""
    if kv_format == "bf16":
        return 2 * batch * heads * head_dim * 2
    spec = _meta_spec(batch, heads, head_dim)
    fmt = _format(kv_format)
    codecs = fmt.history(_chunk_tokens(layout, _window_tokens(fmt, layout)), spec)
    return kv_history_bytes_per_block(codecs, layout, spec) // layout.block_tokens


def _ring_bytes(kv_format: _Format, layout: CacheLayout, spec: _TokenSpec, blocks: int) -> int:
    """Bytes of one ring holding `blocks` blocks: with a window W, every block's head of T - W tokens and every
    window but the newest are quantized (each chunk on its own), the newest window is in the model's dtype."""
    if blocks == 0:
        return 0
    window = _window_tokens(kv_format, layout)
    key, value = kv_format.history(_chunk_tokens(layout, window), spec)

    def stored(tokens: int) -> int:
        shape = (spec.batch, tokens, spec.heads, spec.head_dim)
        return 0 if tokens == 0 else key.block_nbytes(*shape) + value.block_nbytes(*shape)

    if not window:
        return blocks * stored(layout.block_tokens)
    head = layout.block_tokens - window
    return blocks * stored(head) + (blocks - 1) * stored(window) + window * spec.bytes_per_token


def history_ring_bytes(
    kv_format: str,
    layout: CacheLayout,
    blocks: int,
    batch: int,
    heads: int,
    head_dim: int,
    bytes_per_value: int = 2,
) -> int:
    """Exact bytes of one ring holding `blocks` blocks in `kv_format` (keys and values), without tensors."""
    spec = _meta_spec(batch, heads, head_dim, bytes_per_value)
    if kv_format == "bf16":
        return blocks * layout.block_tokens * spec.bytes_per_token
    return _ring_bytes(_format(kv_format), layout, spec, blocks)


def quantizes_sink(kv_format: str) -> bool:
    """Whether `kv_format` stores the sink quantized too (else it stays in the model's dtype)."""
    return kv_format != "bf16" and _format(kv_format).sink is not None


def sink_bytes(kv_format: str, tokens: int, batch: int, heads: int, head_dim: int) -> int:
    """Bytes of a quantized sink of `tokens` tokens (keys + values) in a format that `quantizes_sink`."""
    if not quantizes_sink(kv_format):
        raise ValueError(f"kv_format {kv_format!r} keeps the sink in the model's dtype")
    return 2 * _QUANTIZED[kv_format].sink.block_nbytes(batch, tokens, heads, head_dim)


def sink_bytes_per_token(kv_format: str, batch: int, heads: int, head_dim: int) -> int:
    """Bytes of one quantized sink token (key + value) for the formats whose sink bytes grow linearly with its
    tokens (fp8-all); q2's centroids make `sink_bytes` the exact figure."""
    return sink_bytes(kv_format, 1, batch, heads, head_dim)
