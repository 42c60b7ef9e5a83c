"""Full vs ISPA sessions driving a small multi-layer transformer, block by block."""

from __future__ import annotations

import json

import torch

from ispa import AttentionSession, FullPolicy, ISPAPolicy, statistics_nbytes
from tests.fixtures.toy_model import ToyConfig, ToyRun, ToyTransformer

CONFIG = ToyConfig()  # 4 layers, 2 rings of 2 history blocks of 5 tokens, 1 latent frame per block
T_WARM = (
    3  # frames = blocks here: blocks 0-2 warm up (1 and 2 see history), the absorb runs at the end of block 2
)
BLOCKS = 6
BATCH = 2
FLOAT_BYTES = 4


def run(model, policy, blocks=BLOCKS, seed=0):
    session = AttentionSession(policy, CONFIG.num_layers, CONFIG.layout())
    toy_run = ToyRun(model, session, seed, batch=BATCH)
    outputs, reports = [], []
    for _ in range(blocks):
        block_outputs, report = toy_run.step()
        outputs.append(block_outputs)
        reports.append(report)
    return outputs, reports, session


def ispa_policy():
    return ISPAPolicy(k_fraction=0.5, t_warm=T_WARM)


def bytes_of(tokens: int) -> int:
    """Bytes of `tokens` keys plus values in one layer."""
    return 2 * BATCH * tokens * CONFIG.heads * CONFIG.head_dim * FLOAT_BYTES


SINK_BYTES = bytes_of(CONFIG.sink_tokens)
RING_BYTES = bytes_of(CONFIG.history_blocks * CONFIG.block_tokens)


def test_ispa_is_bit_identical_to_full_until_the_transition():
    model = ToyTransformer(CONFIG)
    full_outputs, full_reports, _ = run(model, FullPolicy())
    ispa_outputs, ispa_reports, _ = run(model, ispa_policy())
    for block in range(T_WARM):
        for ring in range(CONFIG.num_rings):
            assert torch.equal(full_outputs[block][ring], ispa_outputs[block][ring]), (block, ring)
    assert not torch.equal(
        full_outputs[T_WARM][0], ispa_outputs[T_WARM][0]
    )  # afterwards ISPA does change things
    assert [r.phase for r in ispa_reports] == ["warmup"] * T_WARM + ["absorbed"] * (BLOCKS - T_WARM)
    assert [r.event for r in ispa_reports] == [None, None, "absorbed", None, None, None]
    assert {r.phase for r in full_reports} == {"full"} and all(r.event is None for r in full_reports)


def test_half_the_layers_drop_their_history_and_bytes_fall_by_exactly_their_rings():
    model = ToyTransformer(CONFIG)
    _, full_reports, full_session = run(model, FullPolicy())
    _, ispa_reports, ispa_session = run(model, ispa_policy())

    local = ispa_session.local_layers
    assert len(local) == CONFIG.num_layers // 2 and ispa_reports[-1].l_layers == local
    for index, layer in enumerate(ispa_session.cache.layers):
        assert layer.is_local == (index in local)
        expected = SINK_BYTES + (0 if index in local else CONFIG.num_rings * RING_BYTES)
        assert layer.nbytes() == expected, index

    for block, (full, ispa) in enumerate(zip(full_reports, ispa_reports, strict=True)):
        # ring slots are allocated as blocks are written: the history held, never more than the ring
        held = CONFIG.num_rings * bytes_of(min(block + 1, CONFIG.history_blocks) * CONFIG.block_tokens)
        assert full.kv_bytes == CONFIG.num_layers * (SINK_BYTES + held), block
        drop = len(local) * held if block >= T_WARM - 1 else 0
        assert ispa.kv_bytes == full.kv_bytes - drop, block
        assert sum(ispa.kv_bytes_per_layer) == ispa.kv_bytes
        assert ispa.kv_bytes_full_ring == full.kv_bytes == full.kv_bytes_full_ring
        written = (block + 1) * CONFIG.num_rings * CONFIG.block_tokens
        assert ispa.kv_bytes_full_unbounded == CONFIG.num_layers * (SINK_BYTES + bytes_of(written))
    assert ispa_reports[-1].kv_bytes_per_layer == [layer.nbytes() for layer in ispa_session.cache.layers]
    assert full_reports[-1].kv_bytes == full_session.cache.nbytes()


def test_report_contents_across_the_transition():
    model = ToyTransformer(CONFIG)
    _, reports, _ = run(model, ispa_policy())
    dim = CONFIG.dim
    stats_bytes = statistics_nbytes(CONFIG.num_layers, dim)
    assert [r.stats_bytes for r in reports] == [0, stats_bytes, stats_bytes, 0, 0, 0]
    assert [r.index for r in reports] == list(range(BLOCKS))

    assert reports[0].epsilon is None and reports[1].epsilon is None
    eps = reports[T_WARM - 1].epsilon
    assert len(eps) == CONFIG.num_layers and all(e is not None and e >= 0 for e in eps)
    ranked = sorted(range(CONFIG.num_layers), key=lambda i: eps[i])
    assert reports[T_WARM - 1].l_layers == sorted(ranked[: CONFIG.num_layers // 2])

    assert reports[0].history_mass is None and reports[0].merge_seconds == 0.0
    for report in reports[1:]:
        assert report.merge_seconds > 0.0
        local_during_block = report.l_layers if report.phase == "absorbed" else []
        assert [m is None for m in report.history_mass] == [
            i in local_during_block for i in range(CONFIG.num_layers)
        ]
        assert all(0.0 < m < 1.0 for m in report.history_mass if m is not None)
    assert [r.absorb_seconds > 0.0 for r in reports] == [False, False, True, False, False, False]
    assert [r.delta_weight_bytes for r in reports] == [0, 0] + [2 * dim * dim * FLOAT_BYTES] * 4
    for report in reports:
        json.dumps(report.to_dict(), allow_nan=False)


def test_base_weights_are_never_mutated():
    model = ToyTransformer(CONFIG)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    run(model, ispa_policy())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_full_and_ispa_sessions_interleaved_on_one_model_match_separate_runs():
    model = ToyTransformer(CONFIG)
    full_alone, _, _ = run(model, FullPolicy(), seed=3)
    ispa_alone, _, _ = run(model, ispa_policy(), seed=3)

    full_session = AttentionSession(FullPolicy(), CONFIG.num_layers, CONFIG.layout())
    ispa_session = AttentionSession(ispa_policy(), CONFIG.num_layers, CONFIG.layout())
    full_run = ToyRun(model, full_session, 3, batch=BATCH)
    ispa_run = ToyRun(model, ispa_session, 3, batch=BATCH)
    for block in range(BLOCKS):
        ispa_outputs, _ = ispa_run.step()
        full_outputs, _ = full_run.step()
        for ring in range(CONFIG.num_rings):
            assert torch.equal(full_outputs[ring], full_alone[block][ring]), (block, ring)
            assert torch.equal(ispa_outputs[ring], ispa_alone[block][ring]), (block, ring)
