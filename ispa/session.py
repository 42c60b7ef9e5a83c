"""One generation run under a KV policy: the model's self-attention layers call into it.

The model computes q/k/v (RoPE and all) and hands them over together with its output projection; the session
attends over the right keys, keeps the history, learns the absorption statistics, switches layers local, and
returns the projected output. Nothing is stored on the model, so several sessions (e.g. Full and ISPA) can share
one model, even interleaved block by block.

Per block, for every self-attention layer and every ring (LiveAvatar: one ring per denoising step):
1. F-layers: attention over local keys (sink + current block) and over the ring's history, fused by LSE - exactly
   full attention. During warmup/recalibration, (A_loc, A_full) feed the statistics.
2. L-layers: attention over local keys only, then the base projection plus the session's own change ΔW (Evict:
   the base projection alone).
   After a "trim" (Window, Salience) every layer attends to local keys plus its kept history tokens
   (`ispa.token_history`), cut back to the policy's byte budget after each block is added.
3. The current block is appended to the ring after it was attended to (write-after-read; see `ispa.cache`).
`end_block()` then advances the policy and returns a `BlockReport`.

A NaN or +inf log-sum-exp (a numeric failure, e.g. NaN keys) is flagged on the device: each layer keeps the
running maximum of its block's LSEs, read with the block's other values at `end_block()`, which then raises a
RuntimeError naming the block and the layers. A device-side assert instead would poison the process's CUDA
context (every later call fails), and a check read per forward would make the host wait for the device.

Costs to budget: each warmup forward with history adds about 2.5 tokens x D x D-sized fp32 matmuls per layer to the
statistics (G's lower triangle, C and the residual for s), and the statistics hold about 1.5 D^2 fp32 per layer
until the absorb frees them (see `ispa.absorption.AbsorptionStats`). Nothing in a forward reads a value back to
the host; `end_block()` does, once per block (history mass, LSE check, timings), and the absorb once more. The
output projection's `.weight` must be the real-valued weight in Linear convention ([D_out, D]): the statistics and
the solve read it (a quantized module may offer `dequantized_weight()` instead, see `ispa.projection`).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from ispa.absorption import AbsorptionStats, StatisticsReducer, select_local_layers
from ispa.attention import attention_with_lse
from ispa.cache import CacheLayout, KVCache, KVLayerFactory, SinkRingLayer
from ispa.checks import is_int
from ispa.fused_merge import merge_and_measure
from ispa.lean_solve import solve_layer_lean
from ispa.policies.base import Phase, Policy, PolicyState
from ispa.projection import DeltaProjection, base_weight
from ispa.report import BlockReport
from ispa.statistics_precision import StatisticsPrecision, check_statistics_precision
from ispa.timing import SpanTimer
from ispa.token_history import TokenHistory, key_attention_mass

__all__ = ["AttentionSession"]

logger = logging.getLogger(__name__)


class AttentionSession:
    """The KV state and policy state of one generation run.

    Parameters
    ----------
    policy : FullPolicy or ISPAPolicy (any `Policy`).
    num_layers : self-attention layers of the model.
    layout : how history is stored (block size, ring length, rings, frames per block).
    backend : attention backend name for every call (see `ispa.attention_backends`); None follows its rule.
    kv_layer : builds each layer's KV storage from the layout (any `KVLayer`; default `SinkRingLayer`).
    statistics_precision : "exact" (fp32 GEMMs), "fast" (TF32 on CUDA for 16-bit models) or "bf16" (bf16 GEMMs
        with fp32 output for bf16 models, opt-in); None: "fast" on CUDA, "exact" elsewhere (see
        `ispa.statistics_precision` for the bounds on ΔW and ε).
    statistics_reducer : where one run's forwards are split between processes (each with its own session, e.g.
        one per denoising step), sums the statistics over them before each absorb so that every process solves
        the same ΔW (see `AbsorptionStats.sum_across`); None for a run in one process.
    fused_merge : merge local and history attention (and take the two LSE figures the session keeps) in one
        compiled function, `ispa.fused_merge` (opt-in; the eager merge is the reference and the fallback).
    """

    def __init__(
        self,
        policy: Policy,
        num_layers: int,
        layout: CacheLayout,
        *,
        backend: str | None = None,
        kv_layer: KVLayerFactory = SinkRingLayer,
        statistics_precision: StatisticsPrecision | None = None,
        statistics_reducer: StatisticsReducer | None = None,
        fused_merge: bool = False,
    ) -> None:
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be a Policy (e.g. FullPolicy() or ISPAPolicy()), got {policy!r}")
        if not isinstance(layout, CacheLayout):
            raise ValueError(f"layout must be a CacheLayout, got {layout!r}")
        self.cache = KVCache(num_layers, layout, kv_layer)
        policy.check_layout(layout, num_layers)
        self.policy = policy
        self.layout = layout
        self.num_layers = num_layers
        self.backend = backend
        self.statistics_precision = (
            None if statistics_precision is None else check_statistics_precision(statistics_precision)
        )
        if not isinstance(fused_merge, bool):
            raise ValueError(f"fused_merge must be True or False, got {fused_merge!r}")
        self.fused_merge = fused_merge
        self.state: PolicyState = policy.new_state()
        self.block_index = 0
        self._rings_used: list[set[int]] = [set() for _ in range(num_layers)]
        self._blocks_written = [0] * layout.num_rings  # blocks appended per ring, over the whole run
        self._out_projs: list[nn.Module | None] = [None] * num_layers
        self._local_projections: dict[
            int, DeltaProjection | nn.Module
        ] = {}  # a Module: Evict's plain projection
        self._stats: AbsorptionStats | None = None
        self._statistics_reducer = statistics_reducer
        self._epsilon: list[float | None] | None = None
        self._mass_sum: list[Tensor | None] = [None] * num_layers
        self._mass_count = [0] * num_layers
        self._lse_peak: list[Tensor | None] = [None] * num_layers  # this block's largest LSE per layer
        self._merge_timer = SpanTimer()
        self._statistics_timer = SpanTimer()
        self._absorb_timer = SpanTimer()
        self._local_buffers: tuple[Tensor, Tensor] | None = None
        # Budgeted policies (Window, Salience): blocks appended per layer and ring (the ring's slot order follows
        # from it), each history block's accumulated attention mass oldest first (Salience, until the trim), and
        # after the trim the kept tokens per layer and ring.
        self._appends = [[0] * layout.num_rings for _ in range(num_layers)]
        self._tracks_mass = getattr(policy, "retention", None) == "mass"
        self._ring_mass: list[list[list[Tensor]]] = [
            [[] for _ in range(layout.num_rings)] for _ in range(num_layers)
        ]
        self._kept: list[list[TokenHistory | None]] | None = None
        self._format_token_bytes: list[int] = []
        self._closed = False

    # ---- public state ------------------------------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        return self.state.phase

    @property
    def local_layers(self) -> list[int]:
        """Sorted indices of the layers that currently attend to local keys only."""
        return list(self.state.local_layers)

    def attended_history(self, layer: int, ring: int) -> tuple[Tensor, Tensor]:
        """The history keys and values [B, n, H, D] the next forward of `layer` on `ring` attends to besides its
        local keys (ring storage in slot order, or a budgeted policy's kept tokens, oldest first, per head)."""
        self._check_open()
        self._check_layer(layer)
        if self._kept is not None:
            kept = self._kept[layer][ring]
            if kept is not None:
                return kept.k, kept.v
        return self.cache.layers[layer].history(ring)

    # ---- sink --------------------------------------------------------------------------------------------------
    def write_sink(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store layer `layer`'s sink tokens [B, S, H, D] (kept by every layer, local or not)."""
        self._check_open()
        self._check_layer(layer)
        self.cache.layers[layer].write_sink(k, v)

    def sink(self, layer: int) -> tuple[Tensor, Tensor]:
        self._check_open()
        self._check_layer(layer)
        return self.cache.layers[layer].sink()

    def local_buffers(self, like: Tensor, tokens: int) -> tuple[Tensor, Tensor]:
        """Two [B, tokens, H, D] buffers (like `like` [B, *, H, D] in dtype and device) for a layer's local keys
        and values, written in place by the model (e.g. [sink; current block]) instead of concatenated anew.

        One pair serves every layer and forward (reallocated only when the shape, dtype or device changes): a layer
        is done with it when its `self_attention` returns, as the stream orders the next layer's writes after the
        kernels that read it, and history is stored by copying.
        """
        self._check_open()
        shape = (like.shape[0], tokens, *like.shape[2:])
        buffers = self._local_buffers
        if (
            buffers is None
            or buffers[0].shape != shape
            or buffers[0].dtype != like.dtype
            or buffers[0].device != like.device
        ):
            buffers = self._local_buffers = (like.new_empty(shape), like.new_empty(shape))
        return buffers

    # ---- the hot path ------------------------------------------------------------------------------------------
    def self_attention(
        self,
        layer: int,
        q: Tensor,
        local_k: Tensor,
        local_v: Tensor,
        new_k: Tensor,
        new_v: Tensor,
        out_proj: nn.Module,
        ring: int = 0,
    ) -> Tensor:
        """Attention of the current block's queries plus output projection.

        Parameters
        ----------
        q : [B, Lq, H, D].
        local_k, local_v : [B, Lloc, H, D], the sink's keys/values as the model uses them (e.g. roped) followed by
            the current block's.
        new_k, new_v : [B, block_tokens, H, D], the current block's keys/values to keep as history of `ring`.
        out_proj : the layer's nn.Linear, or a module with `.bias` and `.weight` (or `dequantized_weight()`); an
            absorbed layer applies it unchanged plus its own change (`ispa.projection.DeltaProjection`).
        ring : which history ring this forward reads and then extends (at most once per block and layer).

        Returns
        -------
        y : [B, Lq, D_out], out_proj applied to the attention output flattened over heads.
        """
        self._check_open()
        self._check_layer(layer)
        if not is_int(ring) or not 0 <= ring < self.layout.num_rings:
            raise ValueError(f"ring must be an int in [0, {self.layout.num_rings}), got {ring!r}")
        if ring in self._rings_used[layer]:
            raise RuntimeError(
                f"layer {layer} already used ring {ring} in this block; call end_block() between blocks "
                "(each ring is read, then extended, once per block)"
            )
        self._rings_used[layer].add(ring)
        if self._kept is not None:
            return self._budgeted_attention(layer, ring, q, local_k, local_v, new_k, new_v, out_proj)

        projection = self._local_projections.get(layer)
        if projection is not None:
            if out_proj is not self._out_projs[layer]:
                raise RuntimeError(f"layer {layer} was absorbed against a different output projection module")
            out, lse = attention_with_lse(q, local_k, local_v, backend=self.backend)
            self._note_lse(layer, lse)
            return projection(out.flatten(-2))

        self._out_projs[layer] = out_proj
        cache_layer = self.cache.layers[layer]
        out_loc, lse_loc = attention_with_lse(q, local_k, local_v, backend=self.backend)
        self._note_lse(layer, lse_loc)
        hist_k, hist_v = cache_layer.history(ring)
        out, lse = out_loc, lse_loc
        if hist_k.shape[1] > 0:
            out_hist, lse_hist = attention_with_lse(q, hist_k, hist_v, backend=self.backend)
            out, lse = self._merge_history(layer, out_loc, lse_loc, out_hist, lse_hist)
            if self.policy.collects_statistics(self.state):
                with self._statistics_timer.span(q.device):
                    self._statistics(out).update(
                        layer, out_loc.flatten(-2), out.flatten(-2), base_weight(out_proj)
                    )
        if self._tracks_mass:  # before the append, which may overwrite the oldest slot of `hist_k`
            self._add_ring_mass(layer, ring, q, hist_k, new_k, lse)
        cache_layer.append(ring, new_k, new_v)
        self._appends[layer][ring] += 1
        return out_proj(out.flatten(-2))

    def _budgeted_attention(
        self,
        layer: int,
        ring: int,
        q: Tensor,
        local_k: Tensor,
        local_v: Tensor,
        new_k: Tensor,
        new_v: Tensor,
        out_proj: nn.Module,
    ) -> Tensor:
        """After a trim: local keys plus the kept tokens; then the block joins them and the budget is applied."""
        out, lse = attention_with_lse(q, local_k, local_v, backend=self.backend)
        self._note_lse(layer, lse)
        kept = self._kept[layer][ring]
        if kept is not None and kept.tokens > 0:
            out_hist, lse_hist = attention_with_lse(q, kept.k, kept.v, backend=self.backend)
            out, lse = self._merge_history(layer, out, lse, out_hist, lse_hist)
        new_scores = None
        if self._tracks_mass:
            if kept is not None:
                kept.add_mass(key_attention_mass(q, kept.k, lse))
            new_scores = key_attention_mass(q, new_k, lse)
        if kept is None:
            empty = new_scores[:, :0] if new_scores is not None else None
            kept = self._kept[layer][ring] = TokenHistory(new_k[:, :0], new_v[:, :0], empty)
        kept.extend(new_k, new_v, new_scores)
        kept.keep(
            self._kept_tokens(layer, kept, min(self._blocks_written[ring] + 1, self.layout.history_blocks))
        )
        return out_proj(out.flatten(-2))

    # ---- block boundary ----------------------------------------------------------------------------------------
    def end_block(self) -> BlockReport:
        """Close the current block: count it, let the policy act (absorb / recalibrate), and report.

        A NaN or +inf LSE in any of the block's forwards raises RuntimeError (naming the block and layers) and
        closes the session: its history and statistics hold the failure, so the run cannot go on.
        """
        self._check_open()
        history_mass, failed_layers = self._read_block_values()
        if failed_layers:
            block = self.block_index
            self.close()
            raise RuntimeError(
                f"block {block}: the attention of layer(s) {failed_layers} gave a NaN or +inf log-sum-exp "
                "(a numeric failure, e.g. NaN or inf in the keys, values or queries); the run was stopped"
            )
        phase = self.state.phase
        for ring in set().union(*self._rings_used):
            self._blocks_written[ring] += 1
        self._rings_used = [set() for _ in range(self.num_layers)]
        self.state.frames_in_phase += self.layout.frames_per_block
        stats_bytes = 0 if self._stats is None else self._stats.nbytes()
        merge_seconds = self._merge_timer.pop_seconds()
        statistics_seconds = self._statistics_timer.pop_seconds()

        event = None
        action = self.policy.decide(self.state, history_mass)
        if action == "absorb":
            device = torch.device("cpu") if self._stats is None else self._stats.device
            with self._absorb_timer.span(device):
                self._absorb(history_mass)
            event = self.policy.after_phase  # "absorbed", or "evicted" where ΔW is not applied
        elif action == "trim":
            self._trim()
            event = self.policy.after_phase
        elif action == "recalibrate":
            self._start_recalibration()
            event = "recalibration_started"
        absorb_seconds = self._absorb_timer.pop_seconds()

        report = self._report(
            phase, stats_bytes, merge_seconds, statistics_seconds, absorb_seconds, history_mass, event
        )
        self.block_index += 1
        return report

    def request_recalibration(self) -> None:
        """Ask for recalibration; it starts at the end of the current block. Ignored unless layers are absorbed."""
        self._check_open()
        if self.state.phase == "absorbed" or (self.state.phase == "evicted" and self.state.local_layers):
            self.state.recalibration_requested = True
        else:
            logger.info("recalibration request ignored: the session is in phase %r", self.state.phase)

    def history_mass_sums(self) -> tuple[list[Tensor | None], list[int]]:
        """This block's running per-layer history-share sums and forward counts (None/0: not measured yet).

        With `continue_history_mass`, a block whose forwards run in several processes (one after the other) can
        hand the sums on, so the last one reports the same means, summed in the same order, as one process would.
        """
        self._check_open()
        return list(self._mass_sum), list(self._mass_count)

    def continue_history_mass(self, sums: list[Tensor | None], counts: list[int]) -> None:
        """Start this block's history-share sums from an earlier process's `history_mass_sums()`."""
        self._check_open()
        if any(total is not None for total in self._mass_sum):
            raise RuntimeError("history mass can only be continued before the block's first forward")
        if len(sums) != self.num_layers or len(counts) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} sums and counts, got {len(sums)} and {len(counts)}")
        self._mass_sum = list(sums)
        self._mass_count = list(counts)

    def close(self) -> None:
        """Free every tensor the session holds; the session cannot be used afterwards."""
        self.cache.reset()
        self._stats = None
        self._local_projections.clear()
        self._out_projs = [None] * self.num_layers
        self._mass_sum = [None] * self.num_layers
        self._lse_peak = [None] * self.num_layers
        self._local_buffers = None
        self._ring_mass = [[[] for _ in range(self.layout.num_rings)] for _ in range(self.num_layers)]
        self._kept = None
        self._closed = True

    # ---- transitions -------------------------------------------------------------------------------------------
    def _absorb(self, history_mass: list[float | None] | None) -> None:
        """Solve every layer's update, turn the K best layers local, free the statistics.

        The solves are queued without reading anything back; all errors come to the host in one transfer.
        """
        solved: dict[int, tuple[Tensor, Tensor]] = {}
        stats, self._stats = self._stats, None
        if stats is not None and self._statistics_reducer is not None:
            stats.sum_across(self._statistics_reducer)
        for layer in range(self.num_layers):
            if stats is None or stats.count(layer) == 0:
                continue
            weight = base_weight(self._out_projs[layer])
            solved[layer] = solve_layer_lean(stats, layer, weight, self.policy.ridge_lambda())
            stats.free(layer)  # frees D^2 (C), or 2 D^2 with the pair's G, while the delta adds D^2
        errors = torch.stack([error for _, error in solved.values()]).tolist() if solved else []
        eps: list[float | None] = [None] * self.num_layers
        deltas: dict[int, Tensor] = {}
        for (layer, (delta, _)), error in zip(solved.items(), errors, strict=True):
            if math.isfinite(error):
                eps[layer] = error
                deltas[layer] = delta
            else:
                logger.warning(
                    "layer %d: non-finite reconstruction error %r; it stays an F-layer", layer, error
                )

        wanted = self.policy.num_local_layers(self.num_layers)
        k = min(wanted, len(deltas))
        if k < wanted:
            logger.warning(
                "only %d of %d layers have usable statistics; turning %d local", len(deltas), wanted, k
            )
        ranking = [math.inf if e is None else e for e in eps]
        chosen = select_local_layers(ranking, k)
        for layer in chosen:
            if self.policy.applies_delta:
                self._local_projections[layer] = DeltaProjection(self._out_projs[layer], deltas[layer])
            else:
                self._local_projections[layer] = self._out_projs[layer]
            self.cache.layers[layer].make_local()

        self._epsilon = eps
        self.state.phase = self.policy.after_phase
        self.state.frames_in_phase = 0
        self.state.local_layers = tuple(chosen)
        self.state.drift_streak = 0
        self.state.recalibration_requested = False
        self.state.reference_history_mass = (
            None if history_mass is None else [None if i in chosen else m for i, m in enumerate(history_mass)]
        )
        logger.info("absorbed: L-layers %s", chosen)

    def _trim(self) -> None:
        """Move every layer's ring history (oldest first) into kept tokens cut to the budget; drop the rings."""
        self._kept = [[None] * self.layout.num_rings for _ in range(self.num_layers)]
        self._format_token_bytes = [cache_layer.bytes_per_token or 0 for cache_layer in self.cache.layers]
        block = self.layout.block_tokens
        for layer, cache_layer in enumerate(self.cache.layers):
            for ring in range(self.layout.num_rings):
                if self._appends[layer][ring] == 0:
                    continue
                hist_k, hist_v = cache_layer.history(ring)
                slots = [slice(s * block, (s + 1) * block) for s in self._chronological_slots(layer, ring)]
                scores = torch.cat(self._ring_mass[layer][ring], dim=1) if self._tracks_mass else None
                kept = TokenHistory(
                    torch.cat([hist_k[:, span] for span in slots], dim=1),
                    torch.cat([hist_v[:, span] for span in slots], dim=1),
                    scores,
                )
                blocks = min(self._blocks_written[ring], self.layout.history_blocks)
                kept.keep(self._kept_tokens(layer, kept, blocks))
                self._kept[layer][ring] = kept
            cache_layer.make_local()
        self._ring_mass = [[[] for _ in range(self.layout.num_rings)] for _ in range(self.num_layers)]
        self.state.phase = self.policy.after_phase
        self.state.frames_in_phase = 0
        logger.info("history trimmed to %.3f of a ring per layer", self.policy.kept_share(self.num_layers))

    def _kept_tokens(self, layer: int, kept: TokenHistory, blocks: int) -> int:
        """Tokens a layer's ring may keep: its share of the bytes a full ring of `blocks` blocks holds in this
        session's format, divided by the kept tokens' own bytes (the model's dtype, plus scores)."""
        ring_bytes = blocks * self.layout.block_tokens * self._format_token_bytes[layer]
        return math.floor(self.policy.kept_share(self.num_layers) * ring_bytes / kept.bytes_per_token())

    def _chronological_slots(self, layer: int, ring: int) -> list[int]:
        """The ring's valid slots, oldest block first: the n-th block appended went to slot n mod history_blocks."""
        appended = self._appends[layer][ring]
        held = min(appended, self.layout.history_blocks)
        return [n % self.layout.history_blocks for n in range(appended - held, appended)]

    def _add_ring_mass(
        self, layer: int, ring: int, q: Tensor, hist_k: Tensor, new_k: Tensor, lse: Tensor
    ) -> None:
        """Salience during warmup: add this forward's mass to each held block's scores; the new block enters with
        the mass it got as local keys. Scores are kept oldest block first, as the ring's blocks age."""
        blocks = self._ring_mass[layer][ring]
        if hist_k.shape[1] > 0:
            mass = key_attention_mass(q, hist_k, lse)
            block = self.layout.block_tokens
            for age, slot in enumerate(self._chronological_slots(layer, ring)):
                blocks[age] += mass[:, slot * block : (slot + 1) * block]
        blocks.append(key_attention_mass(q, new_k, lse))
        if len(blocks) > self.layout.history_blocks:
            blocks.pop(0)

    def _start_recalibration(self) -> None:
        """Give the L-layers their base projection back and let them rebuild history; statistics start afresh."""
        for layer in self.state.local_layers:
            del self._local_projections[layer]
            self.cache.layers[layer].make_full()
        self.state.phase = "recalibrating"
        self.state.frames_in_phase = 0
        self.state.local_layers = ()
        self.state.recalibrations += 1
        self.state.recalibration_requested = False
        self.state.drift_streak = 0
        self.state.reference_history_mass = None
        logger.info("recalibration %d started", self.state.recalibrations)

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _statistics(self, like: Tensor) -> AbsorptionStats:
        if self._stats is None:
            dim = like.shape[-2] * like.shape[-1]
            self._stats = AbsorptionStats(
                self.num_layers, dim, like.device, precision=self.statistics_precision
            )
        return self._stats

    def _merge_history(
        self, layer: int, out_loc: Tensor, lse_loc: Tensor, out_hist: Tensor, lse_hist: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(merged output, union LSE): the merge, compiled with `fused_merge` (`ispa.fused_merge`), also gives the
        history LSE's peak (the NaN/+inf check at `end_block`) and the history's share of softmax mass, which are
        noted here. The union LSE is only read by salience, so it is only computed for it (else the local one)."""
        with self._merge_timer.span(out_loc.device):
            out, peak, share = merge_and_measure(out_loc, lse_loc, out_hist, lse_hist, fused=self.fused_merge)
        self._note_peak(layer, peak)
        self._add_share(layer, share)
        lse = torch.logaddexp(lse_loc.float(), lse_hist.float()) if self._tracks_mass else lse_loc
        return out, lse

    def _add_share(self, layer: int, share: Tensor) -> None:
        previous = self._mass_sum[layer]
        self._mass_sum[layer] = share if previous is None else previous + share
        self._mass_count[layer] += 1

    def _note_lse(self, layer: int, lse: Tensor) -> None:
        # The running maximum propagates NaN and keeps +inf; -inf (no keys) is the only non-finite value allowed.
        if lse.numel() == 0:
            return
        self._note_peak(layer, lse.amax().float())

    def _note_peak(self, layer: int, peak: Tensor) -> None:
        previous = self._lse_peak[layer]
        self._lse_peak[layer] = peak if previous is None else torch.maximum(previous, peak)

    def _read_block_values(self) -> tuple[list[float | None] | None, list[int]]:
        """(Per-layer mean history share of the block just finished, layers whose LSE went NaN or +inf), read with
        one device sync; the block's sums start afresh."""
        masses = [i for i, total in enumerate(self._mass_sum) if total is not None]
        peaks = [i for i, peak in enumerate(self._lse_peak) if peak is not None]
        history_mass: list[float | None] | None = None
        failed: list[int] = []
        if masses or peaks:
            first = self._mass_sum[masses[0]] if masses else self._lse_peak[peaks[0]]
            device = first.device
            values = torch.stack(
                [self._mass_sum[i].to(device) / self._mass_count[i] for i in masses]
                + [self._lse_peak[i].to(device) for i in peaks]
            ).tolist()
            if masses:
                history_mass = [None] * self.num_layers
                for i, mean in zip(masses, values[: len(masses)], strict=True):
                    history_mass[i] = mean
            failed = [
                i
                for i, peak in zip(peaks, values[len(masses) :], strict=True)
                if math.isnan(peak) or peak == math.inf
            ]
        self._mass_sum = [None] * self.num_layers
        self._mass_count = [0] * self.num_layers
        self._lse_peak = [None] * self.num_layers
        return history_mass, failed

    def _report(
        self,
        phase: Phase,
        stats_bytes: int,
        merge_seconds: float,
        statistics_seconds: float,
        absorb_seconds: float,
        history_mass: list[float | None] | None,
        event: str | None,
    ) -> BlockReport:
        per_layer = self.cache.nbytes_per_layer()
        if self._kept is not None:
            per_layer = [
                held + sum(kept.nbytes() for kept in rings if kept is not None)
                for held, rings in zip(per_layer, self._kept, strict=True)
            ]
        # The Full baselines, in this session's own storage format (bytes per token of its layers): a Full session
        # keeps every layer's ring slots as they are written (lazily, up to `history_blocks` per ring); an
        # unbounded one would keep every block ever written.
        full_ring = full_unbounded = 0
        for cache_layer in self.cache.layers:
            sink_bytes = cache_layer.sink_nbytes()
            full_ring += sink_bytes + sum(
                cache_layer.ring_nbytes(min(count, self.layout.history_blocks))
                for count in self._blocks_written
            )
            full_unbounded += sink_bytes + sum(
                cache_layer.ring_nbytes(count) for count in self._blocks_written
            )
        return BlockReport(
            index=self.block_index,
            phase=phase,
            kv_bytes=sum(per_layer),
            kv_bytes_per_layer=per_layer,
            kv_bytes_full_ring=full_ring,
            kv_bytes_full_unbounded=full_unbounded,
            stats_bytes=stats_bytes,
            epsilon=None if self._epsilon is None else list(self._epsilon),
            l_layers=self.local_layers,
            merge_seconds=merge_seconds,
            statistics_seconds=statistics_seconds,
            absorb_seconds=absorb_seconds,
            history_mass=history_mass,
            recalibrations=self.state.recalibrations,
            event=event,
            delta_weight_bytes=sum(
                p.nbytes() for p in self._local_projections.values() if isinstance(p, DeltaProjection)
            ),
        )

    def _check_layer(self, layer: int) -> None:
        if not is_int(layer) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this session is closed")
