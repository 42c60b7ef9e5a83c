"""How one block of keys or values is stored quantized, and turned back into what attention sees.

A codec encodes one block [B, T, H, D] into a tuple of tensors (codes plus scales) and decodes that tuple into a
caller-given view of the same shape, in place, so a layer can dequantize its whole history into one reusable buffer.

* `Fp8TokenCodec`: float8 e4m3 with one fp32 scale per token and head (amax / 448). e4m3 is a float format, so
  with a per-token scale every value keeps about 3 mantissa bits whatever its channel's magnitude.
* `Fp8ChannelCodec`: the same with one scale per channel and head over the block's tokens (measured, not chosen:
  see `bench/kv_formats.py`).
* `Int4Codec`: 4-bit asymmetric integers (min and step in fp16) over groups along tokens (KIVI's per-channel
  keys: an outlier channel gets its own range) or along channels (per-token values), two codes per byte. The
  fp16 min must be finite: keys or values beyond ±65504 cannot be stored in this format.

Hand-written rather than taken from a library: the packages that ship KV quantizers (e.g. transformers'
`QuantizedCache` through quanto/HQQ) quantize a growing cache with their own layout and residual buffer, not a
fixed-slot ring whose blocks are written once and read whole every forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["BlockCodec", "Fp8ChannelCodec", "Fp8TokenCodec", "Int4Codec"]

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
INT4_LEVELS = 15
_TINY = 1e-12  # an all-zero group still gets a finite step


class BlockCodec(ABC):
    """Encodes one block of keys or values; decodes the stored tuple into a view of the original shape."""

    name: str

    @abstractmethod
    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        """The stored tensors of block `x` [B, T, H, D]."""

    @abstractmethod
    def decode_into(self, stored: tuple[Tensor, ...], out: Tensor) -> None:
        """Write the dequantized block into `out` [B, T, H, D] (any floating dtype), in place."""

    @abstractmethod
    def block_nbytes(self, batch: int, tokens: int, heads: int, head_dim: int) -> int:
        """Bytes `encode` keeps for one block of this shape (codes plus scales), for planning without tensors."""

    @abstractmethod
    def check_block(self, tokens: int, head_dim: int) -> None:
        """Raise ValueError when blocks of this shape cannot be stored (group sizes must divide them)."""


class Fp8TokenCodec(BlockCodec):
    """e4m3 codes with one fp32 scale per (token, head)."""

    name = "fp8-token"

    def check_block(self, tokens: int, head_dim: int) -> None:
        """Any block shape can be stored: the scales need no divisibility."""

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(_TINY) / FP8_MAX
        codes = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return codes, scale

    def decode_into(self, stored: tuple[Tensor, ...], out: Tensor) -> None:
        codes, scale = stored
        out.copy_(codes)  # e4m3 -> bf16/fp16/fp32 is exact
        out.mul_(scale)

    def block_nbytes(self, batch: int, tokens: int, heads: int, head_dim: int) -> int:
        return batch * tokens * heads * (head_dim * 1 + 4)


class Fp8ChannelCodec(Fp8TokenCodec):
    """e4m3 codes with one fp32 scale per (head, channel) over the block's tokens."""

    name = "fp8-channel"

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(_TINY) / FP8_MAX
        codes = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return codes, scale

    def block_nbytes(self, batch: int, tokens: int, heads: int, head_dim: int) -> int:
        return batch * tokens * heads * head_dim + batch * heads * head_dim * 4


class Int4Codec(BlockCodec):
    """Asymmetric 4-bit codes, two per byte (even channel in the low nibble), fp16 min and step per group.

    axis="tokens": a group is `group` consecutive tokens of one (head, channel) - KIVI's per-channel keys.
    axis="channels": a group is `group` consecutive channels of one (token, head) - KIVI's per-token values.
    """

    def __init__(self, axis: str, group: int) -> None:
        if axis not in ("tokens", "channels"):
            raise ValueError(f"Int4Codec axis must be 'tokens' or 'channels', got {axis!r}")
        if isinstance(group, bool) or not isinstance(group, int) or group < 2:
            raise ValueError(f"Int4Codec group must be an int >= 2, got {group!r}")
        self.axis = axis
        self.group = group
        self.name = f"int4-{axis}{group}"

    def check_block(self, tokens: int, head_dim: int) -> None:
        if head_dim % 2:
            raise ValueError(f"int4 KV packs two channels per byte: head_dim must be even, got {head_dim}")
        length = tokens if self.axis == "tokens" else head_dim
        if length % self.group:
            raise ValueError(
                f"int4 KV group of {self.group} {self.axis} does not divide {length} {self.axis}"
            )

    def _grouped(self, x: Tensor) -> tuple[Tensor, int]:
        """`x` split into groups and the dimension to reduce over."""
        if self.axis == "tokens":
            return x.unflatten(1, (x.shape[1] // self.group, self.group)), 2
        return x.unflatten(-1, (x.shape[-1] // self.group, self.group)), -1

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        self.check_block(x.shape[1], x.shape[-1])
        grouped, dim = self._grouped(x.float())
        low = grouped.amin(dim=dim, keepdim=True)
        high = grouped.amax(dim=dim, keepdim=True)
        # Quantize against the stored (fp16-rounded) min and step, so decoding reproduces the levels exactly.
        low16 = low.half()
        step16 = ((high - low) / INT4_LEVELS).clamp_min(_TINY).half().clamp_min(torch.finfo(torch.half).tiny)
        levels = ((grouped - low16.float()) / step16.float()).round_().clamp_(0, INT4_LEVELS).to(torch.uint8)
        levels = levels.flatten(dim - 1, dim) if dim == -1 else levels.flatten(1, 2)
        packed = levels[..., 0::2] | (levels[..., 1::2] << 4)
        return packed.contiguous(), low16, step16

    def decode_into(self, stored: tuple[Tensor, ...], out: Tensor) -> None:
        packed, low, step = stored
        pairs = out.unflatten(-1, (out.shape[-1] // 2, 2))
        pairs[..., 0].copy_(packed & 0x0F)  # the one temporary: a block of nibbles
        pairs[..., 1].copy_(packed >> 4)
        grouped, _ = self._grouped(out)
        grouped.mul_(step).add_(low)

    def block_nbytes(self, batch: int, tokens: int, heads: int, head_dim: int) -> int:
        codes = batch * tokens * heads * head_dim // 2
        groups = batch * tokens * heads * head_dim // self.group
        return codes + 2 * 2 * groups


def largest_group(length: int, cap: int) -> int:
    """The largest divisor of `length` that is at most `cap` (a group size that tiles `length` exactly)."""
    return max(d for d in range(1, min(length, cap) + 1) if length % d == 0) if length > 0 else 1
