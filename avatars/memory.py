"""The GPU memory plan of one run, model-agnostic: terms of bytes during warmup and after it, their peaks, and
whether they fit a GPU.

A backend makes the terms (`avatars.liveavatar.memory_plan` for LiveAvatar); the app only adds them up and
compares them with the GPU it found. A backend that spreads a run over several GPUs declares, on each term, which
of its roles (its own `enum.Enum`, e.g. "rank 0", "decoder rank") holds the term, and what a role holds of it where
that is not the whole term (`Term.shares`); `MemoryPlan.for_role` then gives one role's plan without ever reading
a term's display label.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "GIB",
    "GPU_CARDS",
    "GPUCard",
    "MIB",
    "MemoryPlan",
    "Term",
    "TermKind",
    "compare_peak_bytes",
    "fits_capacity",
]

GIB = 2**30
MIB = 2**20
CUDA_CONTEXT_BYTES = int(1.5 * GIB)  # left free for the CUDA context and the kernels' own workspaces


@dataclass(frozen=True)
class GPUCard:
    """A GPU by name and the total memory its driver reports (nvidia-smi's "MiB" figure), which is less than the
    GB it is sold as: an L40S "48 GB" reports 46,068 MiB = 45.0 GiB."""

    name: str
    capacity_bytes: int


# The plan is checked against these named cards, smallest first. Totals as the driver reports them for these
# models (public nvidia-smi outputs, not measured in this project).
GPU_CARDS = (
    GPUCard("RTX 4090 24 GB", 24_564 * MIB),
    GPUCard("RTX 5090 32 GB", 32_607 * MIB),
    GPUCard("L40S 48 GB", 46_068 * MIB),
    GPUCard("RTX 6000 Ada 48 GB", 49_140 * MIB),
    GPUCard("H100 80 GB", 81_559 * MIB),
    GPUCard("H200 141 GB", 143_771 * MIB),
)


class TermKind(enum.Enum):
    """What a term of the plan is, for code to tell terms apart (their labels are for people)."""

    DIT_WEIGHTS = "the denoising transformer's weights"
    ENCODERS = "the encoders kept on the GPU (the VAE among them)"
    VAE_WEIGHTS = "the VAE's weights alone (where only the decode runs)"
    KV_CACHE = "the KV cache: sink and history rings"
    KV_DEQUANTIZATION_BUFFER = "a quantized KV format's shared dequantization buffers"
    ISPA_STATISTICS = "the ISPA statistics gathered during warmup"
    DELTA_W = "the output projections' absorbed ΔW"
    DECODER_CACHE = "the streaming decoder's cache carried from block to block"
    ACTIVATIONS = "the activations of one block (transient)"
    ABSORB_WORKSPACE = "the absorb's solve workspace (transient)"


@dataclass(frozen=True)
class Term:
    """One part of the GPU memory: bytes during warmup and after it, and how the number was obtained.

    `warmup`/`after` are the term whole, as a single GPU holds it. `roles`: the roles whose GPU holds the term or a
    part of it (empty for a backend with one role: then its one role holds every term). `shares`: for a role that
    holds only a part (or something else in its place, e.g. the VAE alone instead of every encoder), the term it
    holds instead. A role's plan (`MemoryPlan.for_role`) keeps each term's `roles` to say who holds it, and drops
    the shares: it is not split further.
    """

    kind: TermKind
    name: str  # the display label; nothing reads it but people
    warmup: int
    after: int
    basis: str
    transient: bool = False  # allocated only for a moment (a forward, the absorb): the peak takes the largest
    per_model: bool = False  # held once per loaded model, shared by runs advanced side by side (compare mode)
    roles: frozenset[enum.Enum] = frozenset()
    shares: Mapping[enum.Enum, Term] = field(default_factory=dict, hash=False)

    def held_by(self, role: enum.Enum) -> Term:
        """What `role`'s GPU holds of this term: the whole, its share, or nothing (0 bytes, saying who holds it)."""
        if not self.roles:
            return self
        if role in self.shares:
            return replace(self.shares[role], roles=self.roles, shares={})
        if role in self.roles:
            return replace(self, shares={})
        holders = sorted(self.roles, key=lambda r: list(type(r)).index(r))
        return replace(
            self,
            warmup=0,
            after=0,
            basis="held on: "
            + "; ".join(f"{r.value}{' (a part)' if r in self.shares else ''}" for r in holders),
            shares={},
        )


@dataclass(frozen=True)
class MemoryPlan:
    """The settings of one run and every memory term of it; peaks per phase, and the GPU sizes that hold them."""

    settings: dict[str, object]
    terms: tuple[Term, ...] = field(default_factory=tuple)

    def _peak(self, phase: str) -> int:
        held = sum(getattr(t, phase) for t in self.terms if not t.transient)
        return held + max((getattr(t, phase) for t in self.terms if t.transient), default=0)

    @property
    def peak_warmup_bytes(self) -> int:
        """What stays allocated during warmup plus its largest transient."""
        return self._peak("warmup")

    @property
    def peak_after_bytes(self) -> int:
        """What stays allocated after warmup plus its largest transient."""
        return self._peak("after")

    @property
    def peak_bytes(self) -> int:
        return max(self.peak_warmup_bytes, self.peak_after_bytes)

    def fits(self) -> list[str]:
        """The named cards (`GPU_CARDS`) whose reported memory holds the peak plus the CUDA context."""
        return [card.name for card in GPU_CARDS if fits_capacity(self.peak_bytes, card.capacity_bytes)]

    def for_role(self, role: enum.Enum) -> MemoryPlan:
        """The plan of one role's GPU: each term as `Term.held_by(role)` gives it (kinds and roles, no labels)."""
        return MemoryPlan(self.settings, tuple(term.held_by(role) for term in self.terms))


def fits_capacity(peak_bytes: int, capacity_bytes: int) -> bool:
    """Whether a GPU of `capacity_bytes` holds a peak of `peak_bytes` and the CUDA context."""
    return peak_bytes + CUDA_CONTEXT_BYTES <= capacity_bytes


def compare_peak_bytes(first: MemoryPlan, *others: MemoryPlan) -> int:
    """Peak of runs advanced side by side on one model (compare mode: two, or three with a Full run to measure
    drift against): the model's own terms once, every run's held terms, and the largest transient (the runs take
    turns, so their transients never overlap)."""
    plans = (first, *others)
    peak = 0
    for phase in ("warmup", "after"):
        shared = sum(getattr(t, phase) for t in first.terms if t.per_model and not t.transient)
        held = sum(
            getattr(t, phase) for plan in plans for t in plan.terms if not (t.per_model or t.transient)
        )
        transient = max((getattr(t, phase) for plan in plans for t in plan.terms if t.transient), default=0)
        peak = max(peak, shared + held + transient)
    return peak
