"""GPU memory planning: the 14B numbers against hand arithmetic, and the check's messages."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from transformers import UMT5Config, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2ForCTC

from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit.transformer import FP32_MODULES
from avatars.liveavatar.encoders.vae import WanVAE
from avatars.liveavatar.weights import memory
from avatars.liveavatar.weights.fp8 import EXCLUDED_FROM_FP8

MANIFEST = (
    Path(__file__).resolve().parents[3] / "shared" / "reference" / "liveavatar_s2v14b_dit_manifest.json"
)


@pytest.fixture(scope="module")
def plan_14b():
    return memory.plan_memory(PRESETS["14b"], 384, 704, fp8=False)


def _fp32_numel(params: dict) -> int:
    """Values of the DiT's FP32_MODULES in the manifest: stored at 4 bytes, not 2."""
    return sum(
        torch.Size(shape).numel()
        for name, shape in params.items()
        if any(name.startswith(module + ".") for module in FP32_MODULES)
    )


def test_bf16_dit_is_33_15_gb(plan_14b):
    params = json.loads(MANIFEST.read_text())["params"]
    assert sum(torch.Size(s).numel() for s in params.values()) == 16_295_755_609
    assert plan_14b.dit_weights == 16_295_755_609 * 2 + _fp32_numel(params) * 2
    assert f"{plan_14b.dit_weights / 1e9:.2f}" == "33.15"


def test_fp8_dit_counts_every_converted_linear_from_the_manifest():
    params = json.loads(MANIFEST.read_text())["params"]
    fp8_weights = [
        name
        for name, shape in params.items()
        if name.endswith(".weight")
        and len(shape) == 2
        and name != "trainable_cond_mask.weight"
        and not any(part in name for part in EXCLUDED_FROM_FP8)
    ]
    fp8_numel = sum(params[n][0] * params[n][1] for n in fp8_weights)
    total_numel = sum(torch.Size(s).numel() for s in params.values())
    # FP8 converts none of the fp32 modules' linears (they are all in EXCLUDED_FROM_FP8)
    expected = fp8_numel * 1 + (total_numel - fp8_numel) * 2 + _fp32_numel(params) * 2 + 4 * len(fp8_weights)
    plan = memory.plan_memory(PRESETS["14b"], 384, 704, fp8=True)
    assert plan.dit_weights == expected
    assert f"{plan.dit_weights / 1e9:.2f}" == "17.21"


def test_kv_cache_follows_the_engine_layout(plan_14b):
    tokens_per_frame = (384 // 16) * (704 // 16)  # 1056
    # reference frame + FramePack motion: 1 frame at full, 2 frames at 2×, 16 frames at 4× compression
    sink = tokens_per_frame + (tokens_per_frame + 2 * tokens_per_frame // 8 + 16 * tokens_per_frame // 64)
    block = 3 * tokens_per_frame  # 3168
    per_layer = 2 * (sink + 4 * 3 * block) * 5120 * 2  # k and v, bf16
    assert sink == 2640 and plan_14b.kv_cache == 40 * per_layer == 33_305_395_200
    # G shared by pairs of layers (one triangle each), C per layer, odd layers' diagonals, s: 6.29 GB, not 8.39 GB
    assert plan_14b.ispa_statistics == 4 * (20 * 5120**2 + 40 * 5120**2 + 20 * 5120 + 40)
    assert memory.plan_memory(PRESETS["14b"], 384, 704, fp8=False, ispa_warmup=False).ispa_statistics == 0


def test_encoder_parameter_counts_match_their_real_configurations():
    with torch.device("meta"):
        t5 = UMT5EncoderModel(
            UMT5Config(
                vocab_size=256384,
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                relative_attention_num_buckets=32,
                feed_forward_proj="gated-gelu",
            )
        )
        wav2vec2 = Wav2Vec2ForCTC(
            Wav2Vec2Config(
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                intermediate_size=4096,
                feat_extract_norm="layer",
                do_stable_layer_norm=True,
                conv_bias=True,
                vocab_size=33,
            )
        )
        vae = AutoencoderKLWan()
    assert sum(p.numel() for p in t5.parameters()) == memory.UMT5_XXL_ENCODER_PARAMS
    assert sum(p.numel() for p in wav2vec2.parameters()) == memory.WAV2VEC2_LARGE_PARAMS
    assert sum(p.numel() for p in vae.parameters()) == memory.WAN21_VAE_PARAMS
    on_gpu = memory.encoder_bytes(text_encoder_on_gpu=True) - memory.encoder_bytes(text_encoder_on_gpu=False)
    assert on_gpu == 2 * memory.UMT5_XXL_ENCODER_PARAMS  # 11.36 GB of umT5-XXL in bf16


def test_total_is_the_sum_of_its_parts(plan_14b):
    parts = [
        plan_14b.dit_weights,
        plan_14b.kv_cache,
        plan_14b.ispa_statistics,
        plan_14b.encoders,
        plan_14b.activations,
        plan_14b.vae_decoder_cache,
        plan_14b.reserve,
    ]
    assert plan_14b.total == sum(parts)
    assert plan_14b.describe().startswith(
        f"{sum(parts) / 1e9:.2f} GB (dit weights 33.15 GB, kv cache 33.31 GB"
    )


def test_bad_size_is_rejected():
    with pytest.raises(ValueError, match="multiples of 64"):
        memory.plan_memory(PRESETS["tiny"], 100, 64, fp8=False)


def test_check_without_gpu_says_so(plan_14b, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        memory.InsufficientGPUMemoryError,
        match=r"no CUDA GPU is available; this configuration needs 7\d\.\d\d GB",
    ):
        memory.check_gpu_memory(plan_14b)


def test_check_names_needed_and_free(plan_14b, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (48 * 10**9, 50 * 10**9))
    with pytest.raises(memory.InsufficientGPUMemoryError) as err:
        memory.check_gpu_memory(plan_14b)
    assert f"needs {plan_14b.total / 1e9:.2f} GB" in str(err.value)
    assert "only 48.00 GB of 50.00 GB is free" in str(err.value) and "Fake GPU" in str(err.value)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (plan_14b.total, 141 * 10**9))
    memory.check_gpu_memory(plan_14b)  # fits exactly: no error


def test_vae_decoder_cache_constant_matches_a_real_config_decode():
    """The streaming decoder's carried cache, counted from its live tensors, per output pixel in bf16."""
    vae = WanVAE(AutoencoderKLWan().eval())  # the Wan2.1 architecture, random weights
    decoder = vae.stream_decoder()
    decoder.decode_block(torch.randn(1, 16, 2, 8, 8))  # a 64×64 video; the cache is full after two frames
    values = sum(t.numel() for t in decoder._cache if isinstance(t, torch.Tensor))
    assert 2 * values == memory.VAE_DECODER_CACHE_BYTES_PER_PIXEL * 64 * 64
    assert memory.plan_memory(PRESETS["14b"], 704, 384, fp8=True).vae_decoder_cache == 4729 * 704 * 384
