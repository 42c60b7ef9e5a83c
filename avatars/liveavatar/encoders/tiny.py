"""Tiny encoders for CPU tests and the offline demo: the real classes with small configs and random weights.

They match the tiny DiT preset (`avatars.liveavatar.config.PRESETS["tiny"]`): wav2vec2 hidden size 32 with 2 layers
(3 hidden states) and the default conv kernels/strides (so 16 kHz still gives 50 Hz), umT5 d_model 32, and a Wan
VAE with z_dim 16 and the real 4×8×8 compression. The tokenizer is a small unigram vocabulary built in code, saved
and loaded like the real `tokenizer/` folder.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from transformers import (
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
)

TINY_AUDIO_DIM = 32
TINY_AUDIO_LAYERS = 2
TINY_TEXT_DIM = 32

_WORDS = [
    "a",
    "an",
    "the",
    "person",
    "man",
    "woman",
    "girl",
    "boy",
    "speaks",
    "talks",
    "smiles",
    "laughs",
    "looks",
    "at",
    "camera",
    "in",
    "front",
    "of",
    "studio",
    "warm",
    "light",
    "portrait",
    "face",
    "eyes",
    "mouth",
    "head",
    "hair",
    "bright",
    "dark",
    "soft",
    "background",
    "close",
    "up",
    "video",
    "natural",
    "expression",
    "and",
    "with",
]
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


def tiny_wav2vec2(
    seed: int = 0,
    *,
    num_layers: int = TINY_AUDIO_LAYERS,
    conv_dim: int = 16,
    positional_taps: int = 16,
    positional_groups: int = 2,
) -> tuple[Wav2Vec2ForCTC, Wav2Vec2FeatureExtractor]:
    """A CTC wav2vec2 with the large model's layout (stable layer norm) but 32 wide and 2 layers deep.

    The keywords give a deeper variant with the real 128-tap positional convolution for measurements.
    """
    config = Wav2Vec2Config(
        hidden_size=TINY_AUDIO_DIM,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(conv_dim,) * 7,
        num_conv_pos_embeddings=positional_taps,
        num_conv_pos_embedding_groups=positional_groups,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
        vocab_size=32,
    )
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(config).eval()
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    return model, extractor


def tiny_tokenizer() -> T5Tokenizer:
    """A umT5-style unigram tokenizer (pad 0, eos 1, unk 2) over a few prompt words and single characters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + word, -2.0 - 0.01 * i) for i, word in enumerate(_WORDS)]
    vocab += [("▁", -5.0)] + [(ch, -8.0) for ch in _LETTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_umt5(vocab_size: int, seed: int = 0) -> UMT5EncoderModel:
    """A umT5 encoder (per-layer relative position buckets, gated GELU) with d_model 32."""
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    return UMT5EncoderModel(config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    """A Wan2.1-layout VAE (z_dim 16, 4× temporal and 8× spatial compression) with base width 8."""
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ).eval()
