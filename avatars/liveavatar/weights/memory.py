"""How much GPU memory a LiveAvatar configuration needs, and a check that says so before anything is loaded.

Parts (bytes, 1 GB = 1e9 B):
* DiT weights, counted from the model built on `meta`: bf16 (fp32 for `FP32_MODULES`), or with FP8 every linear layer the
  official conversion quantizes stored as 1 byte per weight plus a 4-byte scale (biases stay bf16).
* KV cache in the engine's layout: per layer, one sink (reference frame + motion tokens) shared by the 4 denoising
  steps' rings, each ring holding up to 3 history blocks (slots are allocated as written); keys and values,
  `heads·head_dim` wide; the sink in bf16, the history in the run's KV format (bf16, fp8 or int4 codes plus
  scales, `ispa.quantized_cache`), plus a quantized format's one shared dequantization buffer.
* ISPA statistics during warmup: G (symmetric, half a D×D) and C (a full D×D) per layer in fp32, in the engine's
  paired-triangle layout (`ispa.statistics_nbytes`). After the absorb the statistics are gone and the L-layers'
  rings too (`kv_cache_bytes_after_absorb`).
* Encoders kept on the GPU: the VAE and wav2vec2 always (every block needs them when streaming), the umT5-XXL
  encoder only when it is not offloaded to the CPU between prompts. Parameter counts were taken from the real
  configurations built on `meta` (see the test).
* Activations: an estimate (not a measurement) of one DiT block forward plus one VAE block decode, and a fixed
  reserve for the CUDA context and allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from avatars.liveavatar.block_layout import DENOISING_STEPS, HISTORY_BLOCKS, cache_layout
from avatars.liveavatar.config import DiTConfig
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.dit.transformer import stored_dtype
from avatars.liveavatar.weights.fp8 import is_excluded_from_fp8
from ispa import CacheLayout, ISPAPolicy, statistics_nbytes
from ispa.quantized_cache import history_bytes_per_token

GB = 1e9

UMT5_XXL_ENCODER_PARAMS = 5_680_910_336  # UMT5EncoderModel (d_model 4096, 24 layers, vocab 256384)
WAV2VEC2_LARGE_PARAMS = 315_472_545  # Wav2Vec2ForCTC, wav2vec2-large-xlsr-53-english
WAN21_VAE_PARAMS = 126_892_531  # AutoencoderKLWan with its default (Wan2.1) configuration

VAE_DECODER_WIDTH = 96  # channels of the Wan2.1 decoder at full resolution
# The Wan2.1 decoder's causal-conv cache, carried from block to block, per output pixel in bf16: read off a
# decode with the real config (exactly linear in pixels; checked in tests/avatars/test_weights_memory.py).
VAE_DECODER_CACHE_BYTES_PER_PIXEL = 4729
CUDA_RESERVE_BYTES = 2 * 10**9  # CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation (estimate)


class InsufficientGPUMemoryError(RuntimeError):
    """The configuration does not fit the GPU (or there is no GPU); the message gives both numbers."""


@dataclass(frozen=True)
class MemoryPlan:
    """GPU bytes per part of one LiveAvatar configuration."""

    dit_weights: int
    kv_cache: int
    ispa_statistics: int
    encoders: int
    activations: int
    vae_decoder_cache: int
    reserve: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def describe(self) -> str:
        parts = ", ".join(
            f"{f.name.replace('_', ' ')} {getattr(self, f.name) / GB:.2f} GB" for f in fields(self)
        )
        return f"{self.total / GB:.2f} GB ({parts})"


def dit_weight_bytes(model: nn.Module, fp8: bool, bytes_per_value: int = 2) -> int:
    """Bytes of the DiT's weights as loaded (`model` may live on `meta`); its fp32 modules at 4 bytes a value."""
    total = sum(
        t.numel() * (4 if stored_dtype(name, torch.bfloat16) == torch.float32 else bytes_per_value)
        for name, t in model.state_dict().items()
    )
    if not fp8:
        return total
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not is_excluded_from_fp8(name):
            total -= module.weight.numel() * (bytes_per_value - 1)  # 1 byte per FP8 weight
            total += 4  # its fp32 scale
    return total


def kv_cache_bytes(
    num_layers: int,
    dim: int,
    sink_tokens: int,
    block_tokens: int,
    *,
    rings: int = DENOISING_STEPS,
    history_blocks: int = HISTORY_BLOCKS,
    bytes_per_value: int = 2,
    kv_format: str = "bf16",
    heads: int | None = None,
) -> int:
    """Keys + values of every layer: one sink shared by all rings, plus `history_blocks` blocks held per ring.

    Ring slots are allocated as blocks are written, so `history_blocks` is what a ring holds at the moment counted
    (the ring length once it is full). The sink is stored at `bytes_per_value`; history in `kv_format`
    (`ispa.quantized_cache`, codes plus scales, which needs `heads` to size per-head scales).
    """
    sink = 2 * sink_tokens * dim * bytes_per_value
    if kv_format == "bf16":
        token = 2 * dim * bytes_per_value
    else:
        if heads is None:
            raise ValueError(f"kv_format {kv_format!r} needs heads to count its scales")
        layout = CacheLayout(block_tokens=block_tokens, history_blocks=HISTORY_BLOCKS)
        token = history_bytes_per_token(kv_format, layout, 1, heads, dim // heads)
    return num_layers * (sink + rings * history_blocks * block_tokens * token)


def kv_cache_bytes_after_absorb(
    num_layers: int,
    dim: int,
    sink_tokens: int,
    block_tokens: int,
    k_fraction: float,
    *,
    rings: int = DENOISING_STEPS,
    history_blocks: int = HISTORY_BLOCKS,
    bytes_per_value: int = 2,
    kv_format: str = "bf16",
    heads: int | None = None,
) -> int:
    """KV bytes once ISPA has absorbed: every layer keeps its sink, only the F-layers keep their rings.

    The number of L-layers follows the policy's own rounding (`ISPAPolicy.num_local_layers`).
    """
    local = ISPAPolicy(k_fraction=k_fraction).num_local_layers(num_layers)
    sink_only = kv_cache_bytes(
        local, dim, sink_tokens, block_tokens, rings=0, bytes_per_value=bytes_per_value
    )
    f_layers = kv_cache_bytes(
        num_layers - local,
        dim,
        sink_tokens,
        block_tokens,
        rings=rings,
        history_blocks=history_blocks,
        bytes_per_value=bytes_per_value,
        kv_format=kv_format,
        heads=heads,
    )
    return sink_only + f_layers


def dequantized_history_bytes(
    dim: int,
    block_tokens: int,
    kv_format: str,
    bytes_per_value: int = 2,
    history_blocks: int = HISTORY_BLOCKS,
) -> int:
    """The quantized formats' one shared dequantization buffer: one layer's ring of keys and values (0 for bf16)."""
    if kv_format == "bf16":
        return 0
    return 2 * history_blocks * block_tokens * dim * bytes_per_value


def encoder_bytes(text_encoder_on_gpu: bool, bytes_per_value: int = 2) -> int:
    """VAE + wav2vec2 (always on the GPU) and the umT5-XXL encoder when it is not offloaded."""
    params = (
        WAN21_VAE_PARAMS + WAV2VEC2_LARGE_PARAMS + (UMT5_XXL_ENCODER_PARAMS if text_encoder_on_gpu else 0)
    )
    return params * bytes_per_value


def activation_bytes(config: DiTConfig, sink_tokens: int, block_tokens: int, height: int, width: int) -> int:
    """Estimate of the largest live activations: one block forward of the DiT, then one block of VAE decode.

    DiT: the gathered keys and values attended to (sink + history + current block), about twelve hidden-size
    tensors of the block's tokens, and the FFN's two widest tensors. VAE: about eight full-resolution maps of
    `VAE_DECODER_WIDTH` channels over the 4 video frames one latent frame decodes to. All bf16.
    """
    attended = sink_tokens + (HISTORY_BLOCKS + 1) * block_tokens
    dit = 2 * (2 * attended * config.dim + 12 * block_tokens * config.dim + 2 * block_tokens * config.ffn_dim)
    vae = 2 * 8 * 4 * height * width * VAE_DECODER_WIDTH
    return dit + vae


def plan_memory(
    config: DiTConfig,
    height: int,
    width: int,
    *,
    fp8: bool,
    ispa_warmup: bool = True,
    text_encoder_on_gpu: bool = False,
    kv_format: str = "bf16",
) -> MemoryPlan:
    """GPU memory for generating `height`×`width` video with this DiT configuration (peak during warmup if asked).

    The KV cache is counted with full rings, as a Full run holds from its fourth block on, plus the quantized
    formats' dequantization buffer; `avatars.liveavatar.memory_plan` splits the run into warmup and after.
    """
    if height <= 0 or width <= 0 or height % 64 or width % 64:
        raise ValueError(f"video size must be positive multiples of 64, got {height}×{width}")
    with torch.device("meta"):
        model = LiveAvatarDiT.from_config(config)
    latent_height, latent_width = height // 8, width // 8
    sink_tokens = model.sink_token_count(latent_height, latent_width)
    block_tokens = cache_layout(model.tokens_per_frame(latent_height, latent_width)).block_tokens
    return MemoryPlan(
        dit_weights=dit_weight_bytes(model, fp8),
        kv_cache=kv_cache_bytes(
            config.num_layers,
            config.dim,
            sink_tokens,
            block_tokens,
            kv_format=kv_format,
            heads=config.num_heads,
        )
        + dequantized_history_bytes(config.dim, block_tokens, kv_format),
        ispa_statistics=statistics_nbytes(config.num_layers, config.dim) if ispa_warmup else 0,
        encoders=encoder_bytes(text_encoder_on_gpu),
        activations=activation_bytes(config, sink_tokens, block_tokens, height, width),
        vae_decoder_cache=VAE_DECODER_CACHE_BYTES_PER_PIXEL * height * width,
        reserve=CUDA_RESERVE_BYTES,
    )


def check_gpu_memory(plan: MemoryPlan, device: torch.device | str | None = None) -> None:
    """Raise InsufficientGPUMemoryError unless the plan fits the free memory of the CUDA device."""
    if not torch.cuda.is_available():
        raise InsufficientGPUMemoryError(
            f"no CUDA GPU is available; this configuration needs {plan.describe()}"
        )
    device = torch.device("cuda" if device is None else device)
    free, total = torch.cuda.mem_get_info(device)
    if plan.total > free:
        raise InsufficientGPUMemoryError(
            f"not enough GPU memory on {torch.cuda.get_device_name(device)}: needs {plan.describe()}, "
            f"but only {free / GB:.2f} GB of {total / GB:.2f} GB is free. Try FP8, a smaller video size, "
            "offloading the text encoder, or a larger GPU."
        )
