"""The KV-layer contract: another storage plugs into `AttentionSession` by subclassing `KVLayer` alone.

`BlockListLayer` keeps each ring as a list of block tensors (no preallocated ring, no private state shared with
`SinkRingLayer`), so a session that reached past the contract, or a cache that built `SinkRingLayer` itself,
would fail here.
"""

from __future__ import annotations

import pytest
import torch

from ispa import AttentionSession, CacheLayout, FullPolicy, ISPAPolicy, KVCache, KVLayer
from ispa.cache import SinkRingLayer
from tests.fixtures.toy_model import ToyConfig, ToyRun, ToyTransformer

CONFIG = ToyConfig()
BLOCKS = 6


class BlockListLayer(KVLayer):
    """History as a Python list of whole blocks per ring; attention sees their concatenation."""

    def __init__(self, layout: CacheLayout) -> None:
        super().__init__(layout)
        self.reset()

    def reset(self) -> None:
        self.is_local = False
        self._sink: tuple[torch.Tensor, torch.Tensor] | None = None
        self._blocks: list[list[tuple[torch.Tensor, torch.Tensor]]] = [
            [] for _ in range(self.layout.num_rings)
        ]
        self._token_bytes: int | None = None

    def write_sink(self, k, v):
        self._sink = (k.clone(), v.clone())
        self._token_bytes = 2 * k[:, :1].nbytes

    def sink(self):
        if self._sink is None:
            raise RuntimeError("no sink")
        return self._sink

    def history(self, ring):
        blocks = self._blocks[ring]
        if not blocks:
            k = self._sink[0][:, :0]
            return k, k
        return torch.cat([k for k, _ in blocks], dim=1), torch.cat([v for _, v in blocks], dim=1)

    def append(self, ring, k, v):
        if self.is_local:
            raise RuntimeError("local")
        self._blocks[ring] = [*self._blocks[ring], (k.clone(), v.clone())][-self.layout.history_blocks :]

    def filled_blocks(self, ring):
        return len(self._blocks[ring])

    def make_local(self):
        self.is_local = True
        self._blocks = [[] for _ in range(self.layout.num_rings)]

    def make_full(self):
        self.is_local = False
        self._blocks = [[] for _ in range(self.layout.num_rings)]

    @property
    def bytes_per_token(self):
        return self._token_bytes

    def sink_nbytes(self):
        return 0 if self._sink is None else sum(t.nbytes for t in self._sink)

    def nbytes(self):
        held = sum(k.nbytes + v.nbytes for ring in self._blocks for k, v in ring)
        return self.sink_nbytes() + held


def run(policy, kv_layer):
    session = AttentionSession(policy, CONFIG.num_layers, CONFIG.layout(), kv_layer=kv_layer)
    toy = ToyRun(ToyTransformer(CONFIG), session, seed=3)
    steps = [toy.step() for _ in range(BLOCKS)]
    return [outputs for outputs, _ in steps], [report for _, report in steps], session


@pytest.mark.parametrize("policy", [FullPolicy(), ISPAPolicy(k_fraction=0.5, t_warm=3)], ids=["full", "ispa"])
def test_a_subclassed_storage_gives_the_same_run_as_the_ring_storage(policy):
    ring_outputs, ring_reports, _ = run(policy, SinkRingLayer)
    list_outputs, list_reports, session = run(policy, BlockListLayer)
    assert all(isinstance(layer, BlockListLayer) for layer in session.cache.layers)
    for ring_block, list_block in zip(ring_outputs, list_outputs, strict=True):
        for a, b in zip(ring_block, list_block, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # key order differs once a ring wraps
    assert [r.l_layers for r in list_reports] == [r.l_layers for r in ring_reports]
    # The report counts what this storage holds, from its own tensors; local layers keep only their sink.
    assert list_reports[-1].kv_bytes_per_layer == [layer.nbytes() for layer in session.cache.layers]
    for index in list_reports[-1].l_layers:
        layer = session.cache.layers[index]
        assert layer.is_local and layer.nbytes() == layer.sink_nbytes()


def test_a_storage_missing_part_of_the_contract_cannot_be_built():
    class Incomplete(KVLayer):
        def write_sink(self, k, v): ...

    with pytest.raises(TypeError):
        Incomplete(CONFIG.layout())


def test_the_cache_refuses_a_factory_that_builds_something_else():
    with pytest.raises(ValueError, match="KVLayer"):
        KVCache(2, CONFIG.layout(), layer_factory=lambda layout: object())
