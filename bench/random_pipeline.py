"""A LiveAvatar pipeline of real-size parts with random weights: a benchmark fixture for a GPU without checkpoints.

Every part has the shapes of the real 14B run, so the time and memory of the streaming loop are the real loop's:

- DiT: `PRESETS["14b"]` (16.3 B parameters), built directly on the device in the run's dtype with each module's own
  initialisation (no fp32 copy on the way, which would need 65 GB), then converted to FP8 if asked, the way the
  real loader converts it after the LoRA merge.
- VAE: diffusers' `AutoencoderKLWan()` with its defaults, which are the Wan2.1 VAE's configuration.
- wav2vec2: the wav2vec2-large-xlsr-53 configuration (24 layers, 1024 wide, so 25 hidden states), fp32 as loaded.
- Text: a umT5 encoder with d_model 4096 but a single layer, over the tiny tokenizer's vocabulary (no download).
  The prompt is encoded once per run, outside the timed blocks, so only the shape of its output matters to the
  DiT; like the real umT5-XXL (5.7 B parameters) it waits on the CPU between prompts.

Random weights give random video: these runs measure speed and memory, never quality.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from transformers import (
    UMT5Config,
    UMT5EncoderModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
)

from avatars.liveavatar.config import PRESETS, DiTConfig
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.encoders.audio import SAMPLE_RATE, AudioEncoder
from avatars.liveavatar.encoders.text import TextEncoder
from avatars.liveavatar.encoders.tiny import tiny_tokenizer
from avatars.liveavatar.encoders.vae import WanVAE
from avatars.liveavatar.pipeline import LiveAvatarPipeline
from avatars.liveavatar.sizing import LIVEAVATAR_SIZES, SizeChoice
from avatars.liveavatar.weights.fp8 import convert_linears_to_fp8

RANDOM_LABEL = "LiveAvatar-shaped model with random weights (benchmark fixture): measures speed, not quality"


@dataclass(frozen=True)
class RandomPipelineSpec:
    """The configurations of the four parts; `LIVEAVATAR_14B` is the real one."""

    dit: DiTConfig
    vae: dict[str, Any]  # AutoencoderKLWan keyword arguments
    wav2vec2: dict[str, Any]  # Wav2Vec2Config keyword arguments
    umt5: dict[str, Any]  # UMT5Config keyword arguments (the vocabulary is the tokenizer's)
    sizes: tuple[SizeChoice, ...]


LIVEAVATAR_14B = RandomPipelineSpec(
    dit=PRESETS["14b"],
    vae={},
    wav2vec2={
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "conv_bias": True,
        "vocab_size": 33,
    },
    umt5={
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 1,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "feed_forward_proj": "gated-gelu",
    },
    sizes=LIVEAVATAR_SIZES,
)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_dit(
    config: DiTConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> LiveAvatarDiT:
    """The DiT with its modules' own random initialisation, allocated once, on `device`, in `dtype`."""
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        return LiveAvatarDiT.from_config(config).eval()


def build_random_pipeline(
    spec: RandomPipelineSpec,
    device: torch.device | str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    seed: int = 0,
) -> LiveAvatarPipeline:
    """All four parts on `device` (the text encoder is offloaded to the CPU between prompts on CUDA)."""
    device = torch.device(device)
    dit = random_dit(spec.dit, device, dtype, seed)
    if fp8:
        convert_linears_to_fp8(dit)
    torch.manual_seed(seed + 1)
    with torch.device(device), _default_dtype(dtype):
        vae = AutoencoderKLWan(**spec.vae).eval()
    with torch.device(device):
        wav2vec2 = Wav2Vec2ForCTC(Wav2Vec2Config(**spec.wav2vec2)).eval()  # fp32, as the real one is loaded
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )
    tokenizer = tiny_tokenizer()
    offload = device.type == "cuda"  # like the real umT5-XXL, it visits the GPU only to encode the prompt
    with torch.device("cpu" if offload else device), _default_dtype(dtype):
        umt5 = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **spec.umt5)).eval()
    text = TextEncoder(umt5, tokenizer, text_len=spec.dit.text_len, device=device, offload=offload)
    return LiveAvatarPipeline(
        dit,
        AudioEncoder(wav2vec2, extractor),
        text,
        WanVAE(vae),
        label=RANDOM_LABEL,
        is_test_model=True,
        size_divisor=64,
        sizes=spec.sizes,
        model=next((name for name, config in PRESETS.items() if config == spec.dit), "14b"),
        weights="fp8" if fp8 else "bf16",
    )
