"""Evict, Window and Salience: each tested for the property that defines it, and all at ISPA's memory."""

from __future__ import annotations

import math

import pytest
import torch

import ispa.session as session_module
from ispa import (
    AttentionSession,
    CacheLayout,
    EvictPolicy,
    FullPolicy,
    ISPAPolicy,
    SaliencePolicy,
    WindowPolicy,
    make_policy,
)
from tests.fixtures.toy_model import ToyConfig, ToyRun, ToyTransformer

CONFIG = ToyConfig(num_layers=4, block_tokens=5, history_blocks=3, num_rings=2)
T_WARM = 3  # frames = blocks here: the transition comes at the end of block 2, with full rings


def _run(policy, blocks: int, model: ToyTransformer) -> list:
    session = AttentionSession(policy, CONFIG.num_layers, CONFIG.layout())
    run = ToyRun(model, session, seed=11)
    return [run.step() for _ in range(blocks)], session


def test_evict_is_ispa_with_delta_forced_to_zero_bit_for_bit(monkeypatch) -> None:
    model = ToyTransformer(CONFIG)
    evict, evict_session = _run(EvictPolicy(k_fraction=0.5, t_warm=T_WARM), 6, model)
    ispa, _ = _run(ISPAPolicy(k_fraction=0.5, t_warm=T_WARM), 6, model)
    real_solve = session_module.solve_layer_lean

    def zero_delta(*args):
        delta, error = real_solve(*args)
        return torch.zeros_like(delta), error  # same ε, so the same ranking

    monkeypatch.setattr(session_module, "solve_layer_lean", zero_delta)
    zeroed, _ = _run(ISPAPolicy(k_fraction=0.5, t_warm=T_WARM), 6, model)

    for (out_e, rep_e), (out_z, rep_z) in zip(evict, zeroed, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(out_e, out_z, strict=True))
        assert rep_e.epsilon == rep_z.epsilon and rep_e.l_layers == rep_z.l_layers
        assert rep_e.kv_bytes == rep_z.kv_bytes
    assert evict[2][1].event == "evicted" and evict[3][1].phase == "evicted"
    assert len(evict_session.local_layers) == 2 and evict[-1][1].delta_weight_bytes == 0
    # ΔW matters: real ISPA departs from Evict once it absorbed, never before.
    assert all(torch.equal(a, b) for a, b in zip(evict[2][0], ispa[2][0], strict=True))
    assert not torch.equal(evict[4][0][-1], ispa[4][0][-1])


def test_every_comparison_policy_holds_ispas_bytes_after_warmup_and_full_s_before() -> None:
    model = ToyTransformer(CONFIG)
    runs = {
        name: _run(make_policy(name, k_fraction=0.25, t_warm=T_WARM), 6, model)[0]
        for name in ("full", "ispa", "evict", "window", "salience")
    }
    for name in ("evict", "window", "salience"):
        for index in range(2):  # warmup: the same output and bytes as Full, bit for bit
            assert all(
                torch.equal(a, b) for a, b in zip(runs[name][index][0], runs["full"][index][0], strict=True)
            )
        for index in range(2, 6):
            ispa_bytes, own = runs["ispa"][index][1].kv_bytes, runs[name][index][1].kv_bytes
            assert abs(own - ispa_bytes) <= 0.1 * ispa_bytes, (name, index, own, ispa_bytes)
        assert not torch.equal(runs[name][-1][0][-1], runs["full"][-1][0][-1])
    # Window and Salience spread the bytes over every layer instead of dropping whole layers.
    window_layers = runs["window"][-1][1].kv_bytes_per_layer
    assert max(window_layers) == min(window_layers)


def _drive(
    policy, num_layers: int, layout: CacheLayout, blocks: int, sink: int = 3, heads: int = 2, dim: int = 4
):
    """Random queries and keys through a session; every value carries its token's id in channel 0.

    Yields (block index, session, per-layer per-ring inputs of that block) after each end_block."""
    generator = torch.Generator().manual_seed(5)
    session = AttentionSession(policy, num_layers, layout)
    out_proj = torch.nn.Identity()
    out_proj.weight = torch.eye(heads * dim)
    sinks = []
    for layer in range(num_layers):
        k, v = (
            torch.randn(1, sink, heads, dim, generator=generator),
            torch.randn(1, sink, heads, dim, generator=generator),
        )
        v[..., 0] = -1.0  # sink ids
        session.write_sink(layer, k, v)
        sinks.append((k, v))
    for block in range(blocks):
        inputs = {}
        for ring in range(layout.num_rings):
            for layer in range(num_layers):
                q = 2 * torch.randn(1, layout.block_tokens, heads, dim, generator=generator)
                k = 2 * torch.randn(1, layout.block_tokens, heads, dim, generator=generator)
                v = torch.randn(1, layout.block_tokens, heads, dim, generator=generator)
                ids = block * layout.block_tokens + torch.arange(layout.block_tokens, dtype=torch.float32)
                v[..., 0] = ids.view(1, -1, 1)
                sink_k, sink_v = sinks[layer]
                session.self_attention(
                    layer, q, torch.cat([sink_k, k], 1), torch.cat([sink_v, v], 1), k, v, out_proj, ring
                )
                inputs[layer, ring] = (q, k, v)
        yield block, session, session.end_block(), inputs


def _kept_ids(session: AttentionSession, layer: int, ring: int) -> torch.Tensor:
    return session.attended_history(layer, ring)[1][0, :, :, 0].round().long()  # [tokens, heads]


def test_window_keeps_exactly_the_sink_and_the_newest_tokens() -> None:
    layout = CacheLayout(block_tokens=4, history_blocks=3, num_rings=2)
    policy = WindowPolicy(k_fraction=0.25, t_warm=2)  # 4 layers, K = 1: 3/4 of a ring, 9 of 12 tokens
    for block, session, report, _ in _drive(policy, 4, layout, blocks=6):
        for layer in range(4):
            assert session.sink(layer)[1][0, :, :, 0].eq(-1).all()
            for ring in range(2):
                ids = _kept_ids(session, layer, ring)
                if block < 1:
                    continue  # warmup: the ring in its slot order
                written = (block + 1) * 4
                held = math.floor(0.75 * min(block + 1, 3) * 4)
                expected = torch.arange(written - held, written).view(-1, 1).expand(-1, 2)
                assert torch.equal(ids, expected), (block, layer, ring)
        if block >= 1:
            assert report.phase == "evicted" or report.event == "evicted"


def _reference_salience(layout: CacheLayout, sink_k: torch.Tensor, inputs, budget_tokens) -> list[list[int]]:
    """Kept ids per head after the last of `inputs`, from a plain float64 softmax over [sink; block; history]: each
    token's mass is the sum of its attention probabilities over every query that saw it (as the block's own key,
    then as history). Warmup (blocks 0 and 1): a ring of the newest whole blocks; then the top `budget_tokens(b)`."""
    heads = sink_k.shape[2]
    history: list[list[list]] = [[] for _ in range(heads)]  # per head: [id, key, mass], oldest first
    for block, (q, k, _) in enumerate(inputs):
        for head in range(heads):
            keys = torch.cat([sink_k[0, :, head], k[0, :, head]] + [t[1].view(1, -1) for t in history[head]])
            logits = q[0, :, head].double() @ keys.double().T / math.sqrt(q.shape[-1])
            column = torch.softmax(logits, dim=-1).sum(0)
            local = sink_k.shape[1] + layout.block_tokens
            for index, token in enumerate(history[head]):
                token[2] += column[local + index].item()
            new = [
                [block * layout.block_tokens + i, k[0, i, head], column[sink_k.shape[1] + i].item()]
                for i in range(layout.block_tokens)
            ]
            history[head] = history[head] + new
            if block < 1:
                history[head] = history[head][-layout.history_tokens :]
            else:
                top = sorted(history[head], key=lambda t: -t[2])[: budget_tokens(block)]
                history[head] = sorted(top, key=lambda t: t[0])
    return [[t[0] for t in history[head]] for head in range(heads)]


def test_salience_keeps_exactly_the_top_tokens_of_a_reference_accumulated_mass() -> None:
    layout = CacheLayout(block_tokens=4, history_blocks=3, num_rings=1)
    heads, dim = 2, 4
    kv_bytes = 2 * heads * dim * 4  # fp32 key + value per token
    scaled = kv_bytes / (kv_bytes + 4 * heads)  # the kept tokens' fp32 scores count in the bytes too

    def budget_tokens(block: int) -> int:  # half of the layers' rings' bytes (2 layers, K = 1)
        return math.floor(0.5 * min(block + 1, 3) * layout.block_tokens * scaled)

    assert budget_tokens(6) == 5  # token-granular: 5 of a ring's 12 tokens
    inputs: dict[int, list] = {0: [], 1: []}
    policy = SaliencePolicy(k_fraction=0.5, t_warm=2)
    differ = 0
    for block, session, _, block_inputs in _drive(policy, 2, layout, blocks=7, heads=heads, dim=dim):
        for layer in range(2):
            inputs[layer].append(block_inputs[layer, 0])
            if block < 1:
                continue
            expected = _reference_salience(layout, session.sink(layer)[0], inputs[layer], budget_tokens)
            ids = _kept_ids(session, layer, 0)
            assert ids.shape[0] == budget_tokens(block)
            for head in range(heads):
                assert ids[:, head].tolist() == expected[head], (block, layer, head)
        if block >= 1:
            differ += int(not torch.equal(_kept_ids(session, 0, 0)[:, 0], _kept_ids(session, 0, 0)[:, 1]))
    assert differ > 0  # the heads chose different tokens: the selection is per head


def test_settings_are_validated_and_named() -> None:
    with pytest.raises(ValueError, match="k_fraction"):
        WindowPolicy(k_fraction=1.5)
    with pytest.raises(ValueError, match="t_warm"):
        SaliencePolicy(t_warm=0)
    assert make_policy("window", k_fraction=0.25, t_warm=9, lam=0.1) == WindowPolicy(
        k_fraction=0.25, t_warm=9
    )
    assert make_policy("evict", k_fraction=0.25, lam=0.1) == EvictPolicy(k_fraction=0.25, lam=0.1)
    assert make_policy("full", k_fraction=0.25) == FullPolicy()
