"""Every GPU memory term of one LiveAvatar run, during warmup and after it, and which GPU of the run holds it.

The terms come from `terms` (weights from the DiT built on `meta`; KV, statistics and ΔW bytes from the engine's own
layout, checked against live tensors in tests/avatars/test_memory_live_tensors.py) plus two transient estimates. The peak
of a phase is what stays allocated plus the larger of its transients (a block forward's activations, or the
absorb's solve workspace); it is what `torch.cuda.max_memory_allocated` would see, without allocator fragmentation.
A GPU fits when the peak leaves at least 1.5 GiB for the CUDA context.

Over a pipeline of ranks (`RankLayout`) each term says, where it is made, which roles hold it (`roles.Role`) and
what a role holds of it when that is not the whole term: a DiT rank holds the DiT, the sink and only its 4/N steps'
rings, and the ISPA statistics and ΔW of every layer (all its steps' forwards run through every layer); rank 0
alone holds the encoders (it reads and encodes every request); the rank that decodes holds the VAE and its decoder
cache; each holds the activations of what it runs.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from avatars.liveavatar.block_layout import (
    DENOISING_STEPS,
    HISTORY_BLOCKS,
    LATENT_FRAMES_PER_BLOCK,
    cache_layout,
)
from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.memory_plan.roles import (
    DECODING,
    DENOISING,
    ENCODING,
    Role,
    rings_per_dit_rank,
    role_of_rank,
    roles_of,
)
from avatars.liveavatar.memory_plan.terms import (
    VAE_DECODER_CACHE_BYTES_PER_PIXEL,
    dequantized_history_bytes,
    dit_activation_bytes,
    dit_weight_bytes,
    encoder_bytes,
    kv_cache_bytes,
    kv_cache_bytes_after_absorb,
    kv_cache_bytes_after_trim,
    salience_score_bytes,
    vae_decode_activation_bytes,
    vae_weight_bytes,
)
from avatars.liveavatar.rank_layout import RankLayout
from avatars.liveavatar.sizing import LIVEAVATAR_SIZES, SIZE_DIVISOR, planned_size
from avatars.memory import GIB, MemoryPlan, Term, TermKind, fits_capacity
from ispa import LIGHTEST_KV_FORMAT, BudgetedPolicy, FullPolicy, ISPAPolicy, Policy, statistics_nbytes
from ispa.quantized_cache import KV_FORMATS, quantizes_sink

__all__ = [
    "ABSORB_WORKSPACE_BYTES_PER_DIM2",
    "InsufficientGPUMemoryError",
    "check_fits_free_memory",
    "lightest_plan",
    "plan_roles",
    "plan_terms",
]

# What the absorb allocates on top of the statistics at its largest moment, in units of D² bytes, measured on live
# tensors: one layer's solve (`ispa.lean_solve`: the fp64 factor and C W, the fp32 ΔW and 512-wide panels) is
# 24 D² at D = 5120 (`bench/memory_transients.py`, tests/avatars/test_memory_transients.py), and a tiny DiT run's
# whole absorb, panels of D/10, 26 D² (the solve it ran before, from `stats.G(layer)`, 46 D²).
ABSORB_WORKSPACE_BYTES_PER_DIM2 = 26


def plan_roles(
    height: int,
    width: int,
    *,
    model: str,
    weights: str,
    kv_format: str,
    policy: Policy,
    layout: RankLayout | None = None,
    text_encoder_on_gpu: bool = False,
    audio_fp32: bool = False,
) -> dict[Role, MemoryPlan]:
    """The plan of each kind of GPU one run at `height`×`width` uses: {ONE_GPU: plan} without a layout, else one
    plan per role of `layout`, in rank order. `policy`: the run's `ispa.FullPolicy` or `ispa.ISPAPolicy` (its
    `t_warm` and `k_fraction`). `audio_fp32`: wav2vec2 held in fp32 instead of the official bf16. Bad settings
    raise ValueError naming the field."""
    plan = plan_terms(
        height,
        width,
        model=model,
        weights=weights,
        kv_format=kv_format,
        policy=policy,
        layout=layout,
        text_encoder_on_gpu=text_encoder_on_gpu,
        audio_fp32=audio_fp32,
    )
    return {role: plan.for_role(role) for role in roles_of(layout)}


def plan_terms(
    height: int,
    width: int,
    *,
    model: str,
    weights: str,
    kv_format: str,
    policy: Policy,
    layout: RankLayout | None = None,
    text_encoder_on_gpu: bool = False,
    audio_fp32: bool = False,
) -> MemoryPlan:
    """Every term of the run whole (as one GPU holds it), each declaring the roles of `layout` that hold it and
    what a role holds where that is less; `plan_roles` splits it with `MemoryPlan.for_role`."""
    _check_settings(height, width, model=model, weights=weights, kv_format=kv_format, policy=policy)
    config = PRESETS[model]
    with torch.device("meta"):
        dit = LiveAvatarDiT.from_config(config)
    latent = (height // 8, width // 8)
    cache = cache_layout(dit.tokens_per_frame(*latent))
    sizes = {
        "num_layers": config.num_layers,
        "dim": config.dim,
        "sink_tokens": dit.sink_token_count(*latent),
        "block_tokens": cache.block_tokens,
        "kv_format": kv_format,
        "heads": config.num_heads,
    }
    dim2 = config.dim * config.dim
    own_rings = rings_per_dit_rank(layout)

    def kv_bytes(rings: int) -> tuple[int, int]:
        """KV during warmup and after, when a GPU holds the sink and `rings` of the steps' rings."""
        if isinstance(policy, ISPAPolicy | BudgetedPolicy):
            warm_blocks = math.ceil(policy.t_warm / LATENT_FRAMES_PER_BLOCK)
            held = min(warm_blocks, HISTORY_BLOCKS)  # ring slots are allocated as written
            warm = kv_cache_bytes(**sizes, rings=rings, history_blocks=held)
            if isinstance(policy, ISPAPolicy):
                after = kv_cache_bytes_after_absorb(**sizes, k_fraction=policy.k_fraction, rings=rings)
                return warm, after
            share = policy.kept_share(config.num_layers)
            scores = policy.retention == "mass"
            after = kv_cache_bytes_after_trim(**sizes, kept_share=share, scores=scores, rings=rings)
            if scores:
                warm += salience_score_bytes(
                    config.num_layers, config.num_heads, cache.block_tokens, held, rings
                )
            return warm, after
        full = kv_cache_bytes(**sizes, rings=rings)
        return full, full

    if isinstance(policy, ISPAPolicy):
        policy.check_layout(cache, config.num_layers)
        stats = statistics_nbytes(config.num_layers, config.dim)
        # ΔW in the projection's activation dtype, bf16 for bf16 and FP8 weights alike
        delta = policy.num_local_layers(config.num_layers) * 2 * dim2 if policy.applies_delta else 0
        workspace = ABSORB_WORKSPACE_BYTES_PER_DIM2 * dim2
    else:
        stats = delta = workspace = 0
    buffer = dequantized_history_bytes(config.dim, cache.block_tokens, kv_format, sizes["sink_tokens"])
    weights_bytes = dit_weight_bytes(dit, fp8=weights == "fp8")
    encoders = encoder_bytes(text_encoder_on_gpu, audio_fp32)
    vae = vae_weight_bytes()
    decoder_cache = VAE_DECODER_CACHE_BYTES_PER_PIXEL * height * width
    dit_activations = dit_activation_bytes(config, sizes["sink_tokens"], cache.block_tokens)
    vae_activations = vae_decode_activation_bytes(height, width)
    present = frozenset(roles_of(layout))
    live = "computed, checked against live tensors"

    def term(
        kind: TermKind,
        name: str,
        warmup: int,
        after: int,
        basis: str,
        holders: frozenset[Role],
        *,
        transient: bool = False,
        per_model: bool = False,
        shares: dict[Role, Term] | None = None,
    ) -> Term:
        """A term held by the roles of `holders` the layout has; `shares`: what such a role holds instead of the
        whole term."""
        return Term(
            kind,
            name,
            warmup,
            after,
            basis,
            transient=transient,
            per_model=per_model,
            roles=holders & present,
            shares={role: share for role, share in (shares or {}).items() if role in present},
        )

    kv_warm, kv_after = kv_bytes(DENOISING_STEPS)
    kv_rank_warm, kv_rank_after = kv_bytes(own_rings)
    kv_name = f"KV cache ({_kv_storage(kv_format)})"
    kv_share = Term(
        TermKind.KV_CACHE,
        kv_name,
        kv_rank_warm,
        kv_rank_after,
        f"one-GPU term: sink + {own_rings} of {DENOISING_STEPS} rings",
    )
    encoders_basis = "computed from parameter counts"
    vae_alone = Term(TermKind.VAE_WEIGHTS, "VAE weights", vae, vae, encoders_basis, per_model=True)
    activations_name = "activations of one block (transient)"

    def activations_of(role: Role) -> Term:
        parts = [
            (part, size)
            for part, size, holders in (
                ("DiT block", dit_activations, DENOISING),
                ("VAE decode", vae_activations, DECODING),
            )
            if role in holders
        ]
        size = sum(part_size for _, part_size in parts)
        basis = " + ".join(part for part, _ in parts)
        return Term(TermKind.ACTIVATIONS, activations_name, size, size, basis, transient=True)

    absorb_name = "absorb solve workspace (transient)"
    absorb_basis = "measured on live tensors"
    # The decode runs on its own stream beside the DiT (the decode overlap), so on a GPU that decodes too it can
    # fall in the absorb: count both.
    absorb_and_decode = Term(
        TermKind.ABSORB_WORKSPACE,
        absorb_name,
        workspace + (vae_activations if workspace else 0),
        0,
        absorb_basis + (" + VAE decode beside it" if workspace else ""),
        transient=True,
    )

    terms = (
        term(
            TermKind.DIT_WEIGHTS,
            "DiT weights",
            weights_bytes,
            weights_bytes,
            "computed from the DiT built on meta",
            DENOISING,
            per_model=True,
        ),
        term(
            TermKind.ENCODERS,
            f"encoders (VAE, wav2vec2 {'fp32' if audio_fp32 else 'bf16'}"
            + (", umT5)" if text_encoder_on_gpu else ")"),
            encoders,
            encoders,
            encoders_basis,
            ENCODING | DECODING,
            per_model=True,
            shares={role: vae_alone for role in DECODING - ENCODING},
        ),
        term(
            TermKind.KV_CACHE,
            kv_name,
            kv_warm,
            kv_after,
            live,
            DENOISING,
            shares={role: kv_share for role in DENOISING - {Role.ONE_GPU}},
        ),
        term(TermKind.KV_DEQUANTIZATION_BUFFER, "KV dequantization buffer", buffer, buffer, live, DENOISING),
        term(TermKind.ISPA_STATISTICS, "ISPA statistics (fp32)", stats, 0, live, DENOISING),
        term(TermKind.DELTA_W, "L-layers' projections with ΔW", 0, delta, live, DENOISING),
        term(TermKind.DECODER_CACHE, "VAE decoder cache", decoder_cache, decoder_cache, live, DECODING),
        term(
            TermKind.ACTIVATIONS,
            activations_name,
            dit_activations + vae_activations,
            dit_activations + vae_activations,
            "DiT block (estimate) + VAE decode (measured on live tensors)",
            DENOISING | DECODING,
            transient=True,
            shares={role: activations_of(role) for role in (DENOISING | DECODING) - {Role.ONE_GPU}},
        ),
        term(
            TermKind.ABSORB_WORKSPACE,
            absorb_and_decode.name,
            absorb_and_decode.warmup,
            0,
            absorb_and_decode.basis,
            DENOISING,
            transient=True,
            shares={
                role: (
                    absorb_and_decode if role in DECODING else replace(absorb_and_decode, warmup=workspace)
                )
                for role in DENOISING - {Role.ONE_GPU}
            },
        ),
    )
    ispa = isinstance(policy, ISPAPolicy | BudgetedPolicy)
    settings = {
        "model": model,
        "size": f"{height}x{width}",
        "weights": weights,
        "kv_format": kv_format,
        "policy": policy.name,
        "t_warm": policy.t_warm if ispa else None,
        "k_fraction": policy.k_fraction if ispa else None,
        "text_encoder_on_gpu": text_encoder_on_gpu,
        "audio_encoder": "fp32" if audio_fp32 else "bf16",
        "full_bf16_kv_bytes": kv_cache_bytes(**(sizes | {"kv_format": "bf16"})),
    }
    return MemoryPlan(settings, terms)


def _check_settings(
    height: int, width: int, *, model: str, weights: str, kv_format: str, policy: Policy
) -> None:
    if weights not in ("bf16", "fp8"):
        raise ValueError(f"weights must be 'bf16' or 'fp8', got {weights!r}")
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format must be one of {', '.join(KV_FORMATS)}, got {kv_format!r}")
    if not isinstance(policy, FullPolicy | ISPAPolicy | BudgetedPolicy):
        raise ValueError(f"policy must be an ispa policy (see ispa.POLICIES), got {policy!r}")
    if model not in PRESETS:
        raise ValueError(f"model must be one of {', '.join(PRESETS)}, got {model!r}")
    if height <= 0 or width <= 0 or height % 64 or width % 64:
        raise ValueError(f"size must be positive multiples of 64, got {height}×{width}")


def _kv_storage(kv_format: str) -> str:
    sink = kv_format if quantizes_sink(kv_format) else "bf16"
    return f"{kv_format.removesuffix('-all')} history, {sink.removesuffix('-all').removesuffix('+w')} sink"


class InsufficientGPUMemoryError(RuntimeError):
    """Not even the lightest run fits the GPU; the message gives both numbers."""


def lightest_plan(
    *,
    weights: str,
    model: str = "14b",
    text_encoder_on_gpu: bool = False,
    layout: RankLayout | None = None,
    rank: int = 0,
    max_area: int | None = None,
    audio_fp32: bool = False,
) -> MemoryPlan:
    """The least memory any run can take on the GPU of `rank` (of `layout`; one GPU without one): Full with the
    lightest KV format at the size `max_area` is planned at (default: the smallest of LiveAvatar's sizes)."""
    area = min(size.max_area for size in LIVEAVATAR_SIZES) if max_area is None else max_area
    height, width = planned_size(area, SIZE_DIVISOR)
    plans = plan_roles(
        height,
        width,
        model=model,
        weights=weights,
        kv_format=LIGHTEST_KV_FORMAT,
        policy=FullPolicy(),
        layout=layout,
        text_encoder_on_gpu=text_encoder_on_gpu,
        audio_fp32=audio_fp32,
    )
    return plans[role_of_rank(layout, rank)]


def check_fits_free_memory(plan: MemoryPlan, free_bytes: int, gpu_name: str) -> None:
    """Raise InsufficientGPUMemoryError unless `plan`'s peak plus the CUDA context fits `free_bytes`."""
    if not fits_capacity(plan.peak_bytes, free_bytes):
        settings = plan.settings
        raise InsufficientGPUMemoryError(
            f"not enough GPU memory on {gpu_name}: even the lightest run ({settings['size']}, "
            f"{settings['weights']} weights, {settings['kv_format']} KV, Full) peaks at "
            f"{plan.peak_bytes / GIB:.2f} GiB + 1.5 GiB for the CUDA context, but only {free_bytes / GIB:.2f} GiB "
            "is free. Try FP8 weights (ISPA_FP8=1 or --fp8), offloading the text encoder, or a larger GPU."
        )
