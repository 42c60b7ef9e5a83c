"""AttentionSession / policies / report: the rules of the API and its error messages."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ispa import AttentionSession, BlockReport, CacheLayout, FullPolicy, ISPAPolicy
from ispa.policies import history_mass_drift

HEADS, HEAD_DIM, SINK, BLOCK = 2, 4, 3, 4
DIM = HEADS * HEAD_DIM
LAYOUT = CacheLayout(block_tokens=BLOCK, history_blocks=2)


def tensors(gen, tokens):
    return torch.randn(1, tokens, HEADS, HEAD_DIM, generator=gen)


def forward(session, layer, gen, out_proj, ring=0):
    q, k, v = tensors(gen, BLOCK), tensors(gen, BLOCK), tensors(gen, BLOCK)
    sink_k, sink_v = session.sink(layer)
    with torch.no_grad():
        return session.self_attention(
            layer, q, torch.cat([sink_k, k], 1), torch.cat([sink_v, v], 1), k, v, out_proj, ring
        )


def new_session(policy=None, num_layers=2, layout=LAYOUT, seed=0):
    session = AttentionSession(policy or FullPolicy(), num_layers, layout)
    gen = torch.Generator().manual_seed(seed)
    for layer in range(num_layers):
        session.write_sink(layer, tensors(gen, SINK), tensors(gen, SINK))
    return session, gen


def test_a_ring_is_used_at_most_once_per_block():
    layout = CacheLayout(block_tokens=BLOCK, history_blocks=2, num_rings=2)
    session, gen = new_session(layout=layout)
    proj = nn.Linear(DIM, DIM)
    forward(session, 0, gen, proj, ring=0)
    forward(session, 0, gen, proj, ring=1)
    forward(session, 1, gen, proj, ring=0)  # another layer may use the same ring
    with pytest.raises(RuntimeError, match="already used ring 0"):
        forward(session, 0, gen, proj, ring=0)
    session.end_block()
    forward(session, 0, gen, proj, ring=0)


def test_output_is_the_projection_of_attention_over_sink_block_and_history():
    session, gen = new_session()
    proj = nn.Linear(DIM, DIM)
    stored = []
    for _ in range(4):
        q, k, v = tensors(gen, BLOCK), tensors(gen, BLOCK), tensors(gen, BLOCK)
        sink_k, sink_v = session.sink(0)
        with torch.no_grad():
            y = session.self_attention(0, q, torch.cat([sink_k, k], 1), torch.cat([sink_v, v], 1), k, v, proj)
        history = stored[-LAYOUT.history_blocks :]
        keys = torch.cat([sink_k, k, *(h[0] for h in history)], 1)
        values = torch.cat([sink_v, v, *(h[1] for h in history)], 1)
        with torch.no_grad():
            expected = proj(
                F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, keys, values)))
                .transpose(1, 2)
                .flatten(-2)
            )
        assert y.shape == (1, BLOCK, DIM)
        assert (y - expected).abs().max() <= 1e-5
        stored.append((k, v))
        session.end_block()


def test_bad_arguments_raise_value_error():
    session, gen = new_session()
    proj = nn.Linear(DIM, DIM)
    with pytest.raises(ValueError, match="layer"):
        forward(session, 2, gen, proj)
    with pytest.raises(ValueError, match="ring"):
        forward(session, 0, gen, proj, ring=1)
    with pytest.raises(ValueError, match="policy"):
        AttentionSession("ispa", 2, LAYOUT)
    with pytest.raises(ValueError, match="layout"):
        AttentionSession(FullPolicy(), 2, (4, 2))
    with pytest.raises(ValueError, match="num_layers"):
        AttentionSession(FullPolicy(), 0, LAYOUT)


def test_t_warm_must_cover_more_than_one_block():
    layout = CacheLayout(block_tokens=BLOCK, history_blocks=2, frames_per_block=3)
    with pytest.raises(ValueError, match="t_warm"):
        AttentionSession(ISPAPolicy(t_warm=3), 2, layout)
    AttentionSession(ISPAPolicy(t_warm=4), 2, layout)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k_fraction": -0.1},
        {"k_fraction": 1.5},
        {"k_fraction": True},
        {"t_warm": 0},
        {"t_warm": 2.5},
        {"lam": 0.0},
        {"lam": -1e-3},
        {"lam": math.inf},
        {"recal_threshold": 0.0},
        {"recal_patience": 0},
        {"auto_recalibrate": "yes"},
    ],
)
def test_ispa_policy_rejects_bad_config(kwargs):
    with pytest.raises(ValueError):
        ISPAPolicy(**kwargs)


@pytest.mark.parametrize(
    ("fraction", "layers", "expected"),
    [(0.5, 40, 20), (0.5, 5, 3), (0.3, 10, 3), (0.0, 8, 0), (1.0, 8, 8), (0.25, 6, 2)],
)
def test_k_is_k_fraction_times_n_rounded_half_up(fraction, layers, expected):
    assert ISPAPolicy(k_fraction=fraction).num_local_layers(layers) == expected


def test_policy_names():
    assert FullPolicy().name == "full" and ISPAPolicy().name == "ispa"


def test_closed_session_refuses_work_and_holds_nothing():
    session, gen = new_session()
    forward(session, 0, gen, nn.Linear(DIM, DIM))
    session.close()
    assert session.cache.nbytes() == 0
    with pytest.raises(RuntimeError, match="closed"):
        session.end_block()
    with pytest.raises(RuntimeError, match="closed"):
        forward(session, 0, gen, nn.Linear(DIM, DIM))


def run_to_absorb(projections, num_layers=2):
    session, gen = new_session(ISPAPolicy(k_fraction=0.5, t_warm=2), num_layers)
    for _ in range(2):
        for layer in range(num_layers):
            forward(session, layer, gen, projections[layer])
        session.end_block()
    return session, gen


def poisoned_forward(session, layer, gen, out_proj, bad):
    """A forward whose current block has one key of value `bad` (a numeric failure upstream), which every query's
    score with it takes."""
    q, k, v = tensors(gen, BLOCK), tensors(gen, BLOCK), tensors(gen, BLOCK)
    q[:, :, 0, 0] = 1.0
    k[0, 1, 0, 0] = bad
    sink_k, sink_v = session.sink(layer)
    with torch.no_grad():
        session.self_attention(layer, q, torch.cat([sink_k, k], 1), torch.cat([sink_v, v], 1), k, v, out_proj)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["first block", "with history", "absorbed layer"])
def test_a_non_finite_lse_raises_at_end_block_naming_block_and_layer(where, bad):
    projections = [nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)]
    if where == "absorbed layer":
        session, gen = run_to_absorb(projections)
        layer = session.local_layers[0]
    else:
        session, gen = new_session(ISPAPolicy(k_fraction=0.5, t_warm=2))
        layer = 1
        if where == "with history":
            forward(session, 0, gen, projections[0])
            forward(session, 1, gen, projections[1])
            session.end_block()
    block = session.block_index
    forward(session, 1 - layer, gen, projections[1 - layer])
    poisoned_forward(session, layer, gen, projections[layer], bad)  # no error yet: nothing read per forward
    with pytest.raises(RuntimeError, match=rf"block {block}: .*layer\(s\) \[{layer}\] gave a NaN or \+inf"):
        session.end_block()
    with pytest.raises(RuntimeError, match="closed"):
        session.end_block()
    assert session.cache.nbytes() == 0


def test_neg_inf_lses_of_empty_key_sets_are_not_failures():
    session, gen = new_session()
    proj = nn.Linear(DIM, DIM)
    q = tensors(gen, BLOCK)
    empty = q[:, :0]
    with torch.no_grad():
        session.self_attention(0, q, empty, empty, tensors(gen, BLOCK), tensors(gen, BLOCK), proj)
    assert session.end_block().index == 0


class QuantizedStandIn(nn.Module):
    """Like an FP8 linear: no `.weight`, only a `dequantized_weight()`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("stored", weight.clone())
        self.bias = nn.Parameter(bias.clone(), requires_grad=False)

    def dequantized_weight(self):
        return self.stored.clone()

    def forward(self, x):
        return F.linear(x, self.stored, self.bias)


def test_modules_without_a_weight_attribute_use_dequantized_weight():
    linears = [nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)]
    quantized = [QuantizedStandIn(lin.weight.detach(), lin.bias.detach()) for lin in linears]
    plain_session, plain_gen = run_to_absorb(linears)
    quant_session, quant_gen = run_to_absorb(quantized)
    # same weights and inputs (both sessions draw from seed 0): statistics and solve see the same weight
    assert quant_session.local_layers == plain_session.local_layers
    (local,) = quant_session.local_layers
    state = quant_gen.get_state()
    y_quant = forward(quant_session, local, quant_gen, quantized[local])
    plain_gen.set_state(state)
    y_plain = forward(plain_session, local, plain_gen, linears[local])
    assert torch.allclose(y_quant, y_plain, atol=1e-5)
    # the session counts the change it holds (fp32: the stand-in declares no activation dtype), not the module
    assert quant_session.end_block().delta_weight_bytes == DIM * DIM * 4


def test_an_absorbed_layer_must_keep_its_projection_module():
    projections = [nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)]
    session, gen = run_to_absorb(projections)
    (local,) = session.local_layers
    with pytest.raises(RuntimeError, match="different output projection"):
        forward(session, local, gen, nn.Linear(DIM, DIM))


def test_absorbed_projection_uses_its_own_weight_and_the_modules_current_bias():
    projections = [nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)]
    session, gen = run_to_absorb(projections)
    (local,) = session.local_layers
    proj = projections[local]
    q, k, v = tensors(gen, BLOCK), tensors(gen, BLOCK), tensors(gen, BLOCK)
    sink_k, sink_v = session.sink(local)
    local_k, local_v = torch.cat([sink_k, k], 1), torch.cat([sink_v, v], 1)
    with torch.no_grad():
        first = session.self_attention(local, q, local_k, local_v, k, v, proj)
        session.end_block()
        base = proj(
            F.scaled_dot_product_attention(
                q.transpose(1, 2), local_k.transpose(1, 2), local_v.transpose(1, 2)
            )
            .transpose(1, 2)
            .flatten(-2)
        )
        proj.bias.add_(1.0)
        second = session.self_attention(local, q, local_k, local_v, k, v, proj)
    assert (first - base).abs().max() > 1e-3  # not the base weight
    assert torch.allclose(second - first, torch.ones_like(first), atol=1e-5)  # bias read at call time


def test_history_mass_drift():
    assert history_mass_drift(None, [0.5]) is None
    assert history_mass_drift([None, 0.5], [0.2, None]) is None
    assert history_mass_drift([0.5, None, 0.25], [0.25, 0.9, 0.5]) == pytest.approx((0.25 + 0.25) / 0.75)


def test_report_to_dict_is_json_safe():
    report = BlockReport(
        index=0,
        phase="absorbed",
        kv_bytes=10,
        kv_bytes_per_layer=[4, 6],
        kv_bytes_full_ring=20,
        kv_bytes_full_unbounded=30,
        stats_bytes=0,
        epsilon=[0.1, math.inf],
        l_layers=[0],
        merge_seconds=0.0,
        absorb_seconds=0.0,
        history_mass=[None, 0.4],
        recalibrations=0,
        event=None,
    )
    data = report.to_dict()
    assert data["epsilon"] == [0.1, None] and data["history_mass"] == [None, 0.4]
    assert json.loads(json.dumps(data, allow_nan=False)) == data
