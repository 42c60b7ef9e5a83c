"""The memory model against live tensors: KV and statistics bytes of real DiT runs at small sizes, and the 14B
weights as built on `meta`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.memory_plan import terms as memory
from avatars.liveavatar.weights.fp8 import convert_linears_to_fp8
from ispa import FullPolicy, ISPAPolicy, statistics_nbytes
from ispa.quantized_cache import KV_FORMATS
from tests.fixtures.tiny_dit_run import run_blocks

FIVE_LAYERS = dataclasses.replace(
    PRESETS["tiny"], num_layers=5, dim=96, num_heads=4, ffn_dim=192, audio_inject_layers=(0, 3)
)
CASES = {  # config, latent size, k_fraction, L-layers expected
    "tiny-64x64": (PRESETS["tiny"], (8, 8), 0.5, 2),
    "tiny-128x64": (PRESETS["tiny"], (16, 8), 0.5, 2),
    "five-layers-half": (FIVE_LAYERS, (8, 8), 0.5, 3),  # 2.5 rounds up
    "five-layers-quarter": (FIVE_LAYERS, (8, 8), 0.25, 1),
}


# The formats with per-chunk centroids or a residual window run on two cases (a second block size and the odd
# layer count), which keeps the suite's time down; the per-token formats run on all four.
CHUNKED = ("q2", "int4+w", "q2+w")
FORMAT_CASES = [
    (case, kv_format)
    for kv_format in KV_FORMATS
    for case in CASES
    if kv_format not in CHUNKED or case in ("tiny-128x64", "five-layers-half")
]


@pytest.mark.parametrize(("case", "kv_format"), FORMAT_CASES)
def test_kv_and_statistics_predictions_equal_live_tensors(case, kv_format):
    config, latent, k_fraction, local = CASES[case]
    model = LiveAvatarDiT.from_config(config)
    sizes = {
        "num_layers": config.num_layers,
        "dim": config.dim,
        "sink_tokens": model.sink_token_count(*latent),
        "block_tokens": 3 * model.tokens_per_frame(*latent),
        "kv_format": kv_format,
        "heads": config.num_heads,
    }

    _, full_session, full, factory = run_blocks(config, latent, FullPolicy(), blocks=4, kv_format=kv_format)
    # ring slots are allocated as blocks are written: 1, 2, then 3 blocks per ring, and no more
    held = [memory.kv_cache_bytes(**sizes, history_blocks=n) for n in (1, 2, 3, 3)]
    assert [r.kv_bytes for r in full] == held and full_session.cache.nbytes() == held[-1]
    buffer = memory.dequantized_history_bytes(
        config.dim, sizes["block_tokens"], kv_format, sizes["sink_tokens"]
    )
    assert buffer == (0 if kv_format == "bf16" else factory.buffer_nbytes())
    assert {r.stats_bytes for r in full} == {0}

    policy = ISPAPolicy(k_fraction=k_fraction, t_warm=6)
    _, session, ispa, _ = run_blocks(config, latent, policy, blocks=3, kv_format=kv_format)
    assert [r.phase for r in ispa] == ["warmup", "warmup", "absorbed"]
    assert [r.stats_bytes for r in ispa] == [0, statistics_nbytes(config.num_layers, config.dim), 0]
    after = [
        memory.kv_cache_bytes_after_absorb(**sizes, k_fraction=k_fraction, history_blocks=n) for n in (2, 3)
    ]
    assert [r.kv_bytes for r in ispa] == [held[0], *after] and session.cache.nbytes() == after[-1]
    assert len(ispa[-1].l_layers) == local


@pytest.mark.parametrize("fp8", [False, True])
def test_14b_weight_bytes_equal_the_meta_built_model(fp8):
    with torch.device("meta"):
        model = LiveAvatarDiT.from_config(PRESETS["14b"]).to(torch.bfloat16)
    if fp8:
        convert_linears_to_fp8(model)
    live = sum(t.nbytes for t in model.state_dict().values())
    with torch.device("meta"):
        planned = memory.dit_weight_bytes(LiveAvatarDiT.from_config(PRESETS["14b"]), fp8=fp8)
    assert planned == live


def test_14b_kv_after_absorbing_half_the_layers():
    sink, block, dim = 2640, 3168, 5120
    sink_only = 2 * sink * dim * 2  # keys and values, bf16
    with_rings = 2 * (sink + 4 * 3 * block) * dim * 2  # 4 rings of 3 history blocks
    after = memory.kv_cache_bytes_after_absorb(40, dim, sink, block, 0.5)
    assert after == 20 * sink_only + 20 * with_rings
    full = memory.kv_cache_bytes(40, dim, sink, block)
    assert after / full == (sink + 6 * block) / (sink + 12 * block)  # 0.532: the sink is 6.5 % of Full's KV
    assert (f"{full / 1e9:.2f}", f"{after / 1e9:.2f}") == ("33.31", "17.73")
