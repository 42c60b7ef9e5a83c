"""GPU memory terms: the 14B numbers against hand arithmetic and the real configurations, the lightest plan, and the
load-time check's message."""

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from transformers import UMT5Config, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2ForCTC

from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.dit.transformer import FP32_MODULES
from avatars.liveavatar.encoders.vae import WanVAE
from avatars.liveavatar.loading import build_liveavatar_pipeline
from avatars.liveavatar.memory_plan import (
    InsufficientGPUMemoryError,
    Role,
    check_fits_free_memory,
    lightest_plan,
    plan_roles,
)
from avatars.liveavatar.memory_plan import terms as memory
from avatars.liveavatar.weights.fp8 import EXCLUDED_FROM_FP8
from avatars.liveavatar.weights.hub import WeightPaths
from avatars.memory import CUDA_CONTEXT_BYTES, GIB, TermKind
from ispa import KV_FORMATS, LIGHTEST_KV_FORMAT, FullPolicy, ISPAPolicy, statistics_nbytes

MANIFEST = (
    Path(__file__).resolve().parents[3] / "shared" / "reference" / "liveavatar_s2v14b_dit_manifest.json"
)


@pytest.fixture(scope="module")
def meta_14b():
    with torch.device("meta"):
        return LiveAvatarDiT.from_config(PRESETS["14b"])


def _fp32_numel(params: dict) -> int:
    """Values of the DiT's FP32_MODULES in the manifest: stored at 4 bytes, not 2."""
    return sum(
        torch.Size(shape).numel()
        for name, shape in params.items()
        if any(name.startswith(module + ".") for module in FP32_MODULES)
    )


def test_bf16_dit_is_33_15_gb(meta_14b):
    params = json.loads(MANIFEST.read_text())["params"]
    assert sum(torch.Size(s).numel() for s in params.values()) == 16_295_755_609
    weights = memory.dit_weight_bytes(meta_14b, fp8=False)
    assert weights == 16_295_755_609 * 2 + _fp32_numel(params) * 2
    assert f"{weights / 1e9:.2f}" == "33.15"


def test_fp8_dit_counts_every_converted_linear_from_the_manifest(meta_14b):
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
    weights = memory.dit_weight_bytes(meta_14b, fp8=True)
    assert weights == expected
    assert f"{weights / 1e9:.2f}" == "17.21"


def test_kv_cache_follows_the_engine_layout(meta_14b):
    tokens_per_frame = (384 // 16) * (704 // 16)  # 1056
    # reference frame + FramePack motion: 1 frame at full, 2 frames at 2×, 16 frames at 4× compression
    sink = tokens_per_frame + (tokens_per_frame + 2 * tokens_per_frame // 8 + 16 * tokens_per_frame // 64)
    block = 3 * tokens_per_frame  # 3168
    per_layer = 2 * (sink + 4 * 3 * block) * 5120 * 2  # k and v, bf16
    assert sink == meta_14b.sink_token_count(384 // 8, 704 // 8) == 2640
    assert memory.kv_cache_bytes(40, 5120, sink, block) == 40 * per_layer == 33_305_395_200
    # fp8-all: e4m3 codes plus one fp32 scale per token and head, for the sink as for the history
    fp8_token = 2 * 40 * (128 + 4)
    all_fp8 = memory.kv_cache_bytes(40, 5120, sink, block, kv_format="fp8-all", heads=40)
    assert all_fp8 == 40 * (sink + 12 * block) * fp8_token
    fp8 = memory.kv_cache_bytes(40, 5120, sink, block, kv_format="fp8", heads=40)
    assert fp8 - all_fp8 == 40 * sink * (2 * 5120 * 2 - fp8_token)  # only the sink differs
    # G shared by pairs of layers (one triangle each), C per layer, odd layers' diagonals, s: 6.29 GB, not 8.39 GB
    assert statistics_nbytes(40, 5120) == 4 * (20 * 5120**2 + 40 * 5120**2 + 20 * 5120 + 40)


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


def test_loading_refuses_a_too_small_gpu_before_reading_any_weight(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * GIB, 24 * GIB))
    paths = WeightPaths(*(Path("/nonexistent") for _ in fields(WeightPaths)))
    with pytest.raises(InsufficientGPUMemoryError) as err:
        build_liveavatar_pipeline(paths, device="cuda", fp8=True)
    lightest = lightest_plan(weights="fp8")  # the smallest of LiveAvatar's sizes: 512×320
    message = str(err.value)
    assert "Fake GPU" in message and "only 20.00 GiB is free" in message
    assert f"peaks at {lightest.peak_bytes / GIB:.2f} GiB" in message and "q2 KV" in message


@pytest.mark.parametrize(("max_area", "height", "width"), [(512 * 320, 512, 320), (720 * 400, 704, 384)])
def test_the_lightest_plan_is_full_with_q2_kv_at_the_planned_size(max_area, height, width):
    lightest = lightest_plan(weights="fp8", max_area=max_area)
    assert lightest.settings["size"] == f"{height}x{width}" and lightest.settings["kv_format"] == "q2"
    assert LIGHTEST_KV_FORMAT == "q2" and lightest.settings["policy"] == "full"
    others = [
        plan_roles(height, width, model="14b", weights="fp8", kv_format=kv, policy=policy)[Role.ONE_GPU]
        for kv in KV_FORMATS
        for policy in (FullPolicy(), ISPAPolicy())
    ]
    assert lightest.peak_bytes == min(p.peak_bytes for p in others)
    check_fits_free_memory(lightest, lightest.peak_bytes + CUDA_CONTEXT_BYTES, "Fake GPU")  # exactly fits
    with pytest.raises(InsufficientGPUMemoryError, match="Fake GPU"):
        check_fits_free_memory(lightest, lightest.peak_bytes + CUDA_CONTEXT_BYTES - 1, "Fake GPU")


def test_vae_decoder_cache_constant_matches_a_real_config_decode():
    """The streaming decoder's carried cache, counted from its live tensors, per output pixel in bf16."""
    vae = WanVAE(AutoencoderKLWan().eval())  # the Wan2.1 architecture, random weights
    decoder = vae.stream_decoder()
    decoder.decode_block(torch.randn(1, 16, 2, 8, 8))  # a 64×64 video; the cache is full after two frames
    values = sum(t.numel() for t in decoder._cache if isinstance(t, torch.Tensor))
    assert 2 * values == memory.VAE_DECODER_CACHE_BYTES_PER_PIXEL * 64 * 64
    plan = plan_roles(704, 384, model="14b", weights="fp8", kv_format="fp8", policy=ISPAPolicy())[
        Role.ONE_GPU
    ]
    (decoder_cache,) = [t for t in plan.terms if t.kind is TermKind.DECODER_CACHE]
    assert decoder_cache.warmup == decoder_cache.after == 4729 * 704 * 384


@pytest.mark.parametrize(
    ("dim", "heads", "sink", "block"),
    [(5120, 40, 2640, 3168), (5120, 40, 1600, 1920), (64, 4, 80, 96)],  # 14B at 704x384 and 512x320; tiny CLI
)
def test_q2_under_full_holds_at_most_a_fifth_of_a_bf16_cache(dim, heads, sink, block):
    """Issue 21's contract, by the plan (equal to the live tensors in test_memory_live_tensors)."""
    sizes = {"num_layers": 4, "dim": dim, "sink_tokens": sink, "block_tokens": block, "heads": heads}
    bf16 = memory.kv_cache_bytes(**sizes)
    q2 = memory.kv_cache_bytes(**sizes, kv_format="q2")
    assert q2 <= 0.2 * bf16
    assert memory.kv_cache_bytes(**sizes, kv_format="int4") > q2 * 2  # not merely a smaller int4
