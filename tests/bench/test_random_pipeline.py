"""The benchmark's random-weight pipeline: real 14B sizes (checked on `meta`), and it streams end to end (small, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatars.base import GenerationRequest
from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.dit.transformer import stored_dtype
from avatars.liveavatar.fp8_linear import FP8Linear
from avatars.liveavatar.memory_plan import terms as memory
from avatars.liveavatar.sizing import TINY_SIZES
from bench.random_pipeline import LIVEAVATAR_14B, RandomPipelineSpec, build_random_pipeline, random_dit
from bench.streaming import run_policy, speech
from ispa import ISPAPolicy

SMALL = RandomPipelineSpec(
    dit=PRESETS["tiny"],
    vae={
        "base_dim": 8,
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
    },
    wav2vec2={
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": (16,) * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "conv_bias": True,
        "vocab_size": 32,
    },
    umt5={"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4},
    sizes=TINY_SIZES,
)


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("fp8", [False, True])
def test_the_14b_fixture_has_the_real_sizes(fp8):
    pipe = build_random_pipeline(LIVEAVATAR_14B, "meta", fp8=fp8)
    dit_bytes = sum(t.nbytes for t in pipe.dit.state_dict().values())
    with torch.device("meta"):
        meta_dit = LiveAvatarDiT.from_config(PRESETS["14b"])
    assert dit_bytes == memory.dit_weight_bytes(meta_dit, fp8=fp8)
    assert pipe.dit.dtype == torch.bfloat16 and pipe.dit.device.type == "meta"
    assert isinstance(pipe.dit.blocks[0].self_attn.o, FP8Linear) == fp8
    assert numel(pipe.vae.vae) == memory.WAN21_VAE_PARAMS and pipe.vae.dtype == torch.bfloat16
    assert numel(pipe.audio_encoder.model) == memory.WAV2VEC2_LARGE_PARAMS
    assert pipe.audio_encoder.num_hidden_states == PRESETS["14b"].num_audio_hidden_states
    assert pipe.text_encoder.model.config.d_model == PRESETS["14b"].text_dim
    assert pipe.size_choices()[0] == ("720×400 area (official)", 720 * 400)


def test_random_dit_is_seeded_and_built_in_the_asked_dtype():
    a, b, c = (random_dit(PRESETS["tiny"], "cpu", torch.bfloat16, seed) for seed in (1, 1, 2))
    dtypes = {name: t.dtype for name, t in a.state_dict().items()}
    assert dtypes == {name: stored_dtype(name, torch.bfloat16) for name in dtypes}
    assert set(dtypes.values()) == {torch.bfloat16, torch.float32}
    weights = [m.blocks[0].self_attn.q.weight for m in (a, b, c)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_a_small_fp8_fixture_streams_and_absorbs_into_separate_changes():
    pipe = build_random_pipeline(SMALL, "cpu", dtype=torch.float32, fp8=True)
    portrait = np.random.default_rng(0).integers(0, 256, size=(128, 64, 3), dtype=np.uint8)
    request = GenerationRequest(portrait=portrait, audio=speech(2.5, 0), sample_rate=16000, prompt="a person")
    result = run_policy(pipe, request, ISPAPolicy(k_fraction=0.5, t_warm=6), blocks=3, warmup_blocks=2)
    assert [b["phase"] for b in result["blocks"]] == ["warmup", "warmup", "absorbed"]
    config = SMALL.dit
    local = ISPAPolicy(k_fraction=0.5).num_local_layers(config.num_layers)
    # each L-layer holds its change ΔW next to the FP8 projection, in the model's activation dtype (fp32 here)
    assert result["delta_weight_bytes"] == local * config.dim * config.dim * 4
    sink, block = pipe.dit.sink_token_count(16, 8), 3 * pipe.dit.tokens_per_frame(16, 8)
    expected = memory.kv_cache_bytes_after_absorb(
        config.num_layers, config.dim, sink, block, 0.5, bytes_per_value=4
    )
    assert result["kv_bytes_after_warmup"] == expected
