"""ISPA: a model-agnostic KV-cache engine for autoregressive video transformers.

Attention with log-sum-exp and exact merging, sink + ring KV storage per layer, the closed-form absorption of
history into output projections, the Full / ISPA policies that drive a generation session, and the KV storage
formats (bf16, fp8, int4, q2) chosen by name.
"""

from ispa.absorption import (
    AbsorptionStats,
    reconstruction_error,
    select_local_layers,
    solve_delta,
    solve_layer,
    statistics_nbytes,
)
from ispa.attention import attention_with_lse, available_backends, merge_attention
from ispa.cache import CacheLayout, KVCache, KVLayer, KVLayerFactory, SinkRingLayer
from ispa.policies import (
    POLICIES,
    BudgetedPolicy,
    EvictPolicy,
    FullPolicy,
    ISPAPolicy,
    Policy,
    PolicyState,
    SaliencePolicy,
    WindowPolicy,
    make_policy,
)
from ispa.quantized_cache import KV_FORMATS, LIGHTEST_KV_FORMAT, kv_layer_factory
from ispa.report import BlockReport
from ispa.session import AttentionSession

__all__ = [
    "POLICIES",
    "KV_FORMATS",
    "LIGHTEST_KV_FORMAT",
    "AbsorptionStats",
    "AttentionSession",
    "BlockReport",
    "BudgetedPolicy",
    "CacheLayout",
    "EvictPolicy",
    "FullPolicy",
    "ISPAPolicy",
    "KVCache",
    "KVLayer",
    "KVLayerFactory",
    "Policy",
    "PolicyState",
    "SaliencePolicy",
    "SinkRingLayer",
    "WindowPolicy",
    "attention_with_lse",
    "available_backends",
    "make_policy",
    "kv_layer_factory",
    "merge_attention",
    "reconstruction_error",
    "select_local_layers",
    "solve_delta",
    "solve_layer",
    "statistics_nbytes",
]
