"""The arithmetic of a LiveAvatar run's GPU memory terms, in bytes; `avatars.liveavatar.memory_plan.plan` makes
them into the terms of a plan and says which ranks hold them.

Parts:
* DiT weights, counted from the model built on `meta`: bf16 (fp32 for `FP32_MODULES`), or with FP8 every linear layer the
  official conversion quantizes stored as 1 byte per weight plus a 4-byte scale (biases stay bf16).
* KV cache in the engine's layout: per layer, one sink (reference frame + motion tokens) shared by the 4 denoising
  steps' rings, each ring holding up to 3 history blocks (slots are allocated as written); keys and values,
  `heads·head_dim` wide, in the run's KV format (`ispa.quantized_cache`: bf16, or fp8 / int4 codes plus scales for
  the history, and for the sink too in `fp8-all`), plus a quantized format's shared dequantization buffers.
* ISPA statistics during warmup: G (symmetric, half a D×D) and C (a full D×D) per layer in fp32, in the engine's
  paired-triangle layout (`ispa.statistics_nbytes`). After the absorb the statistics are gone and the L-layers'
  rings too (`kv_cache_bytes_after_absorb`).
* Encoders kept on the GPU: the VAE and wav2vec2 always (every block needs them when streaming), the umT5-XXL
  encoder only when it is not offloaded to the CPU between prompts. Parameter counts were taken from the real
  configurations built on `meta` (see the test). wav2vec2 is held in bf16 (the official numerics), or in fp32.
* Transients: one DiT block forward's activations (an estimate, not a measurement); the VAE decode of one block
  and the absorb's solve, both measured on live tensors (`bench/memory_transients.py`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from avatars.liveavatar.block_layout import DENOISING_STEPS, HISTORY_BLOCKS, LATENT_FRAMES_PER_BLOCK
from avatars.liveavatar.config import DiTConfig
from avatars.liveavatar.dit.transformer import stored_dtype
from avatars.liveavatar.weights.fp8 import is_excluded_from_fp8
from ispa import CacheLayout, ISPAPolicy
from ispa.quantized_cache import history_ring_bytes, quantizes_sink, sink_bytes

UMT5_XXL_ENCODER_PARAMS = 5_680_910_336  # UMT5EncoderModel (d_model 4096, 24 layers, vocab 256384)
WAV2VEC2_LARGE_PARAMS = 315_472_545  # Wav2Vec2ForCTC, wav2vec2-large-xlsr-53-english
WAN21_VAE_PARAMS = 126_892_531  # AutoencoderKLWan with its default (Wan2.1) configuration

# The Wan2.1 decoder's causal-conv cache, carried from block to block, per output pixel in bf16: read off a
# decode with the real config (exactly linear in pixels; checked in tests/avatars/test_memory_terms.py).
VAE_DECODER_CACHE_BYTES_PER_PIXEL = 4729
# What one block's decode allocates on top of that cache at its largest moment, per output pixel in bf16, with the
# full-resolution stages one frame per pass (`encoders.vae_frames`): 2692.5 measured on live tensors of the real
# config on `meta`, the same at every size (5444.5 when the 4 frames go at once, diffusers' way).
VAE_DECODE_TRANSIENT_BYTES_PER_PIXEL = 2693


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
    (the ring length once it is full). What `kv_format` leaves unquantized (`ispa.quantized_cache`: the history in
    bf16, the sink unless the format quantizes it) is stored at the model's `bytes_per_value`; quantized parts are
    codes plus scales, which needs `heads` to size per-head scales.
    """
    unquantized = 2 * dim * bytes_per_value
    if kv_format == "bf16":
        return num_layers * (sink_tokens + rings * history_blocks * block_tokens) * unquantized
    if heads is None:
        raise ValueError(f"kv_format {kv_format!r} needs heads to count its scales")
    layout = CacheLayout(
        block_tokens=block_tokens, history_blocks=HISTORY_BLOCKS, frames_per_block=LATENT_FRAMES_PER_BLOCK
    )
    ring = history_ring_bytes(kv_format, layout, history_blocks, 1, heads, dim // heads, bytes_per_value)
    sink = (
        sink_bytes(kv_format, sink_tokens, 1, heads, dim // heads)
        if quantizes_sink(kv_format)
        else sink_tokens * unquantized
    )
    return num_layers * (sink + rings * ring)


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
        local,
        dim,
        sink_tokens,
        block_tokens,
        rings=0,
        bytes_per_value=bytes_per_value,
        kv_format=kv_format,
        heads=heads,
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


def kv_cache_bytes_after_trim(
    num_layers: int,
    dim: int,
    sink_tokens: int,
    block_tokens: int,
    kept_share: float,
    *,
    scores: bool,
    rings: int = DENOISING_STEPS,
    history_blocks: int = HISTORY_BLOCKS,
    bytes_per_value: int = 2,
    kv_format: str = "bf16",
    heads: int | None = None,
) -> int:
    """KV bytes once Window or Salience has trimmed: every layer keeps its sink and, per ring, the tokens that fit
    `kept_share` of a full ring's bytes in `kv_format`, stored at the model's `bytes_per_value` (plus an fp32 score
    per head with `scores`), as `ispa.session` sizes them."""
    sizes = {"bytes_per_value": bytes_per_value, "kv_format": kv_format, "heads": heads}
    sink = kv_cache_bytes(num_layers, dim, sink_tokens, block_tokens, rings=0, **sizes)
    ring_bytes = kv_cache_bytes(
        1, dim, sink_tokens, block_tokens, rings=1, history_blocks=history_blocks, **sizes
    )
    ring_bytes -= kv_cache_bytes(1, dim, sink_tokens, block_tokens, rings=0, **sizes)
    kept_token = 2 * dim * bytes_per_value + (4 * (heads or 0) if scores else 0)
    kept_tokens = math.floor(kept_share * ring_bytes / kept_token)
    return sink + num_layers * rings * kept_tokens * kept_token


def salience_score_bytes(
    num_layers: int, heads: int, block_tokens: int, history_blocks: int, rings: int
) -> int:
    """Salience's fp32 mass per head of every history token held during warmup."""
    return num_layers * rings * history_blocks * block_tokens * heads * 4


def dequantized_history_bytes(
    dim: int,
    block_tokens: int,
    kv_format: str,
    sink_tokens: int,
    bytes_per_value: int = 2,
    history_blocks: int = HISTORY_BLOCKS,
) -> int:
    """The quantized formats' shared dequantization buffers: one layer's ring of keys and values, and one layer's
    sink when the format quantizes it (0 for bf16)."""
    if kv_format == "bf16":
        return 0
    tokens = history_blocks * block_tokens + (sink_tokens if quantizes_sink(kv_format) else 0)
    return 2 * tokens * dim * bytes_per_value


def encoder_bytes(text_encoder_on_gpu: bool, audio_fp32: bool = False) -> int:
    """VAE and wav2vec2 (always on the GPU) and the umT5-XXL encoder when it is not offloaded, in the dtypes
    `build_liveavatar_pipeline` loads them in: wav2vec2 in bf16 (fp32 with `audio_fp32`), the others in bf16."""
    text = UMT5_XXL_ENCODER_PARAMS * 2 if text_encoder_on_gpu else 0
    return vae_weight_bytes() + WAV2VEC2_LARGE_PARAMS * (4 if audio_fp32 else 2) + text


def vae_weight_bytes() -> int:
    """The Wan2.1 VAE in bf16 (encoder and decoder: it is loaded whole)."""
    return WAN21_VAE_PARAMS * 2


def dit_activation_bytes(config: DiTConfig, sink_tokens: int, block_tokens: int) -> int:
    """Estimate for one DiT block forward: the gathered keys and values attended to (sink + history + current
    block), about twelve hidden-size tensors of the block's tokens, and the FFN's two widest tensors; bf16."""
    attended = sink_tokens + (HISTORY_BLOCKS + 1) * block_tokens
    return 2 * (
        2 * attended * config.dim + 12 * block_tokens * config.dim + 2 * block_tokens * config.ffn_dim
    )


def vae_decode_activation_bytes(height: int, width: int) -> int:
    """One block of VAE decode on top of the decoder cache (measured, `VAE_DECODE_TRANSIENT_BYTES_PER_PIXEL`)."""
    return VAE_DECODE_TRANSIENT_BYTES_PER_PIXEL * height * width
