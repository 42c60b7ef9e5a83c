"""SinkRingLayer / KVCache: lazy allocation, in-place ring writes, explicit counters, real release on make_local."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from ispa import CacheLayout, KVCache, SinkRingLayer

LAYOUT = CacheLayout(block_tokens=4, history_blocks=3, num_rings=2, frames_per_block=1)
BATCH, HEADS, HEAD_DIM = 2, 3, 8


def block(fill: float, tokens: int = 4, dtype=torch.float32):
    k = torch.full((BATCH, tokens, HEADS, HEAD_DIM), fill, dtype=dtype)
    return k, -k


def ring_bytes(dtype=torch.float32) -> int:
    return 2 * BATCH * LAYOUT.history_tokens * HEADS * HEAD_DIM * dtype.itemsize


def test_nothing_is_allocated_before_the_first_write():
    layer = SinkRingLayer(LAYOUT)
    assert layer.nbytes() == 0 and layer.bytes_per_token is None
    k, v = layer.history(0)
    assert k.shape[1] == 0 and v.shape[1] == 0


def slot_bytes(dtype=torch.float32) -> int:
    return 2 * BATCH * LAYOUT.block_tokens * HEADS * HEAD_DIM * dtype.itemsize


def test_first_append_allocates_one_block_slot_with_the_first_tensors_dtype():
    layer = SinkRingLayer(LAYOUT)
    layer.append(1, *block(1.0, dtype=torch.bfloat16))
    assert layer.nbytes() == slot_bytes(torch.bfloat16)
    k, _ = layer.history(1)
    assert k.dtype == torch.bfloat16 and k.shape == (BATCH, 4, HEADS, HEAD_DIM)
    assert layer.history(0)[0].shape == (BATCH, 0, HEADS, HEAD_DIM)  # the other ring is untouched
    assert layer.bytes_per_token == 2 * BATCH * HEADS * HEAD_DIM * 2


def test_memory_follows_the_history_held_and_stops_at_the_ring():
    layer = SinkRingLayer(LAYOUT)
    held = []
    for fill in range(5):
        layer.append(0, *block(float(fill)))
        held.append(layer.nbytes())
    assert held == [slot_bytes() * n for n in (1, 2, 3, 3, 3)] and held[-1] == ring_bytes()


def test_history_holds_exactly_the_last_blocks_oldest_slot_overwritten_in_place():
    layer = SinkRingLayer(LAYOUT)
    for fill in (0.0, 1.0, 2.0):
        layer.append(0, *block(fill))
    base_pointer = layer.history(0)[0].data_ptr()  # the ring is whole now
    for fill in (3.0, 4.0):
        layer.append(0, *block(fill))
    k, v = layer.history(0)
    assert k.shape[1] == 3 * 4 and layer.filled_blocks(0) == 3
    # Blocks 0..4 went to slots 0,1,2,0,1: the ring now holds 3 (slot 0), 4 (slot 1) and 2 (slot 2).
    slot_values = [k[:, i * 4 : (i + 1) * 4].unique().item() for i in range(3)]
    assert slot_values == [3.0, 4.0, 2.0]
    assert torch.equal(v, -k)
    assert k.data_ptr() == base_pointer  # once whole, written in place, never reallocated


def test_history_is_a_view_of_the_ring_not_a_copy():
    layer = SinkRingLayer(LAYOUT)
    layer.append(0, *block(5.0))
    layer.append(0, *block(6.0))
    first, _ = layer.history(0)
    first.fill_(1.5)  # writing into the view writes the ring itself
    second, _ = layer.history(0)
    assert first.data_ptr() == second.data_ptr() and (second == 1.5).all()


def test_counters_are_explicit_not_inferred_from_data():
    layer = SinkRingLayer(LAYOUT)
    layer.append(0, *block(0.0))  # an all-zero block still counts
    assert layer.filled_blocks(0) == 1 and layer.history(0)[0].shape[1] == 4


def test_sink_is_copied_and_rewritten_in_place():
    layer = SinkRingLayer(LAYOUT)
    k, v = block(7.0, tokens=5)
    layer.write_sink(k, v)
    k.fill_(0.0)  # the caller's tensor changes; the stored sink must not
    sink_k, sink_v = layer.sink()
    assert sink_k.shape == (BATCH, 5, HEADS, HEAD_DIM) and (sink_k == 7.0).all() and (sink_v == -7.0).all()
    pointer = sink_k.data_ptr()
    layer.write_sink(*block(8.0, tokens=5))
    assert layer.sink()[0].data_ptr() == pointer and (layer.sink()[0] == 8.0).all()
    assert layer.sink_nbytes() == 2 * BATCH * 5 * HEADS * HEAD_DIM * 4


def test_make_local_releases_ring_storage():
    layer = SinkRingLayer(LAYOUT)
    layer.write_sink(*block(1.0, tokens=5))
    for ring in range(LAYOUT.num_rings):
        layer.append(ring, *block(2.0))
    view, _ = layer.history(0)
    ring_tensor = weakref.ref(view._base)
    del view
    gc.collect()
    assert ring_tensor() is not None
    assert layer.nbytes() == layer.sink_nbytes() + LAYOUT.num_rings * slot_bytes()

    layer.make_local()
    gc.collect()
    assert ring_tensor() is None  # no reference left anywhere: the allocator has the bytes back
    assert layer.is_local and layer.nbytes() == layer.sink_nbytes()
    assert layer.history(0)[0].shape[1] == 0
    assert (layer.sink()[0] == 1.0).all()  # the sink stays
    with pytest.raises(RuntimeError, match="local"):
        layer.append(0, *block(3.0))


def test_make_full_restarts_with_empty_rings():
    layer = SinkRingLayer(LAYOUT)
    layer.append(0, *block(1.0))
    layer.make_local()
    layer.make_full()
    assert not layer.is_local and layer.nbytes() == 0 and layer.filled_blocks(0) == 0
    layer.append(0, *block(9.0))
    assert layer.filled_blocks(0) == 1 and (layer.history(0)[0] == 9.0).all()


def test_reset_forgets_everything_including_dtype():
    layer = SinkRingLayer(LAYOUT)
    layer.write_sink(*block(1.0))
    layer.append(0, *block(1.0))
    layer.reset()
    assert layer.nbytes() == 0 and layer.bytes_per_token is None
    layer.append(0, *block(1.0, dtype=torch.float16))  # a new dtype is accepted after reset
    assert layer.nbytes() == slot_bytes(torch.float16)


def test_bad_input_raises_value_error():
    layer = SinkRingLayer(LAYOUT)
    layer.append(0, *block(1.0))
    with pytest.raises(ValueError, match="tokens"):
        layer.append(0, *block(1.0, tokens=3))
    with pytest.raises(ValueError, match="do not match"):
        layer.append(0, *block(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="ring"):
        layer.append(2, *block(1.0))
    with pytest.raises(ValueError, match="ring"):
        layer.history(-1)
    k, _ = block(1.0)
    with pytest.raises(ValueError):
        layer.append(0, k, torch.zeros(BATCH, 4, HEADS + 1, HEAD_DIM))
    with pytest.raises(ValueError, match="at least one token"):
        layer.write_sink(*block(1.0, tokens=0))
    with pytest.raises(RuntimeError, match="no sink"):
        SinkRingLayer(LAYOUT).sink()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_tokens": 0, "history_blocks": 3},
        {"block_tokens": 4, "history_blocks": 0},
        {"block_tokens": 4, "history_blocks": 3, "num_rings": 0},
        {"block_tokens": 4, "history_blocks": 3, "frames_per_block": -1},
        {"block_tokens": 4.0, "history_blocks": 3},
        {"block_tokens": True, "history_blocks": 3},
    ],
)
def test_cache_layout_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        CacheLayout(**kwargs)


def test_kv_cache_sums_its_layers():
    cache = KVCache(3, LAYOUT)
    cache.layers[0].append(0, *block(1.0))
    cache.layers[2].write_sink(*block(1.0, tokens=2))
    per_layer = cache.nbytes_per_layer()
    assert per_layer == [slot_bytes(), 0, 2 * BATCH * 2 * HEADS * HEAD_DIM * 4]
    assert cache.nbytes() == sum(per_layer) and len(cache) == 3
    cache.reset()
    assert cache.nbytes() == 0
    with pytest.raises(ValueError):
        KVCache(0, LAYOUT)
