"""Recalibration: manual and automatic triggers, restored projections, re-selection, bytes down-up-down."""

from __future__ import annotations

import math

import torch

from ispa import AttentionSession, CacheLayout, FullPolicy, ISPAPolicy, attention_with_lse, statistics_nbytes
from tests.fixtures.toy_model import ToyConfig, ToyRun, ToyTransformer

HEADS, HEAD_DIM, SINK, BLOCK = 2, 8, 4, 8
DIM = HEADS * HEAD_DIM


class SceneDriver:
    """Feeds every layer of a session with q/k/v whose queries and current keys point along a scene direction.

    Inside one scene, history keys point the same way as the queries and take a large share of attention. After a
    switch, new queries point elsewhere, the old history gets almost no mass, and the share on history collapses.
    """

    def __init__(self, session: AttentionSession, seed: int, strength: float = 3.0) -> None:
        self.session = session
        self.gen = torch.Generator().manual_seed(seed)
        self.strength = strength
        torch.manual_seed(seed)
        self.projections = [torch.nn.Linear(DIM, DIM) for _ in range(session.num_layers)]
        for layer in range(session.num_layers):
            session.write_sink(layer, self._noise(SINK), self._noise(SINK))

    def _noise(self, tokens: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(1, tokens, HEADS, HEAD_DIM, generator=self.gen) * scale

    def _along(self, axis: int, tokens: int) -> torch.Tensor:
        x = self._noise(tokens, 0.3)
        x[..., axis] += self.strength
        return x

    def block(self, axis: int):
        """One block through every layer; returns the per-layer inputs and outputs, then the report."""
        records = []
        with torch.no_grad():
            for layer in range(self.session.num_layers):
                q, k, v = self._along(axis, BLOCK), self._along(axis, BLOCK), self._noise(BLOCK)
                sink_k, sink_v = self.session.sink(layer)
                local_k, local_v = torch.cat([sink_k, k], 1), torch.cat([sink_v, v], 1)
                y = self.session.self_attention(layer, q, local_k, local_v, k, v, self.projections[layer])
                records.append((q, local_k, local_v, y))
        return records, self.session.end_block()


def test_manual_recalibration_restores_base_projections_reselects_and_moves_bytes():
    layout = CacheLayout(block_tokens=BLOCK, history_blocks=2)
    session = AttentionSession(ISPAPolicy(k_fraction=0.5, t_warm=3), 4, layout)
    driver = SceneDriver(session, seed=0)
    reports = [driver.block(axis=0)[1] for _ in range(4)]  # absorb at the end of block 2; block 3 absorbed
    first_local = session.local_layers
    first_eps = reports[2].epsilon
    assert reports[2].event == "absorbed" and len(first_local) == 2

    session.request_recalibration()
    assert session.phase == "absorbed"  # takes effect at the end of the current block
    _, started = driver.block(axis=0)
    assert started.event == "recalibration_started" and started.phase == "absorbed"
    assert session.phase == "recalibrating" and session.local_layers == [] and started.recalibrations == 1

    # First recalibrating block: the former L-layers have no history yet, so their output must be exactly the
    # base projection of local attention - the original weights are back.
    records, _ = driver.block(axis=0)
    for layer in first_local:
        q, local_k, local_v, y = records[layer]
        with torch.no_grad():
            expected = driver.projections[layer](attention_with_lse(q, local_k, local_v)[0].flatten(-2))
        assert torch.equal(y, expected), layer

    later = [
        driver.block(axis=0)[1] for _ in range(2)
    ]  # 3 recalibration frames: absorb at the end of the last
    assert later[-1].event == "absorbed" and session.phase == "absorbed"
    assert (
        len(session.local_layers) == 2 and later[-1].epsilon != first_eps
    )  # recomputed from fresh statistics

    kv = [r.kv_bytes for r in reports] + [started.kv_bytes] + [r.kv_bytes for r in later]
    full_bytes = reports[1].kv_bytes
    slot = session.cache.layers[0].bytes_per_token * layout.block_tokens
    low = full_bytes - 2 * slot * layout.history_blocks
    # one slot per layer after block 0 (slots are allocated as written), the whole ring after block 1; down at the
    # absorb, still down when recalibration starts (rings emptied), up while re-warming, down again
    assert kv == [full_bytes - 4 * slot, full_bytes, low, low, low, full_bytes, low]


def test_the_re_warming_layers_collect_statistics_again():
    layout = CacheLayout(block_tokens=BLOCK, history_blocks=2)
    session = AttentionSession(ISPAPolicy(k_fraction=0.5, t_warm=3), 2, layout)
    driver = SceneDriver(session, seed=1)
    for _ in range(3):
        driver.block(axis=0)
    (f_layer,) = set(range(2)) - set(session.local_layers)
    session.request_recalibration()
    driver.block(axis=0)
    stats_bytes = [driver.block(axis=0)[1].stats_bytes for _ in range(3)]
    # One layer alone holds the pair's shared G buffer, its C and s (and its own diagonal if it is the odd one).
    alone = (2 * DIM * DIM + 1 + (DIM if f_layer % 2 else 0)) * 4
    # block 1 of recalibration: only the F-layer sees history; from block 2 on both layers do
    assert stats_bytes == [alone, statistics_nbytes(2, DIM), statistics_nbytes(2, DIM)]


def run_scenes(auto: bool, axes: list[int], seed: int = 2):
    layout = CacheLayout(block_tokens=BLOCK, history_blocks=3)
    policy = ISPAPolicy(
        k_fraction=0.5, t_warm=4, auto_recalibrate=auto, recal_threshold=0.15, recal_patience=2
    )
    session = AttentionSession(policy, 4, layout)
    driver = SceneDriver(session, seed=seed)
    return [driver.block(axis)[1] for axis in axes], session


def test_automatic_recalibration_fires_after_a_scene_change_with_patience():
    axes = [0] * 6 + [5] * 8  # scene change at block 6
    reports, session = run_scenes(True, axes)
    events = {r.index: r.event for r in reports if r.event is not None}
    # absorb after 4 warmup blocks; the drift exceeds the threshold in blocks 6 and 7 -> recalibration at 7;
    # 4 recalibration blocks (8-11) -> absorb again at 11, now fitted to the new scene
    assert events == {3: "absorbed", 7: "recalibration_started", 11: "absorbed"}
    assert session.state.recalibrations == 1
    reference = reports[3].history_mass
    after_change = reports[6].history_mass
    f_layers = [i for i in range(4) if i not in reports[3].l_layers]
    assert all(after_change[i] < 0.5 * reference[i] for i in f_layers)  # the signal the rule watches


def test_no_automatic_recalibration_in_a_stable_scene_or_when_disabled():
    stable, _ = run_scenes(True, [0] * 14)
    assert [r.event for r in stable if r.event is not None] == ["absorbed"]
    disabled, _ = run_scenes(False, [0] * 6 + [5] * 8)
    assert [r.event for r in disabled if r.event is not None] == ["absorbed"]


def test_recalibration_requests_outside_the_absorbed_phase_are_ignored():
    layout = CacheLayout(block_tokens=BLOCK, history_blocks=2)
    session = AttentionSession(ISPAPolicy(k_fraction=0.5, t_warm=3), 2, layout)
    driver = SceneDriver(session, seed=3)
    session.request_recalibration()  # during warmup
    events = [driver.block(axis=0)[1].event for _ in range(5)]
    assert events == [None, None, "absorbed", None, None] and session.state.recalibrations == 0

    config = ToyConfig()
    full = AttentionSession(FullPolicy(), config.num_layers, config.layout())
    toy_run = ToyRun(ToyTransformer(config), full, seed=0)
    full.request_recalibration()
    _, report = toy_run.step()
    assert report.event is None and report.phase == "full" and report.recalibrations == 0


def test_reference_history_mass_covers_f_layers_only():
    reports, session = run_scenes(False, [0] * 5)
    reference = session.state.reference_history_mass
    assert [m is None for m in reference] == [i in session.local_layers for i in range(4)]
    assert all(
        math.isclose(reference[i], reports[3].history_mass[i]) for i in range(4) if reference[i] is not None
    )
