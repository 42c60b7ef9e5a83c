"""Which rank does what in the timestep pipeline: N DiT ranks with S/N denoising steps each (S = 4, the official
schedule, or 3 or 2: every DiT rank owns as many steps, so N must divide S), then the decoder.

Block k's latents go DiT rank 0 (steps 0..) → 1 → … → N-1 → the decoder, so at steady state every stage works on
a different block and a block leaves the pipeline once per stage time instead of once per 4 forwards.

Process counts (K) and their mapping:
  K=2: 1 DiT rank (all 4 steps) + a decoder rank; with `decoder_on_last_dit`, 2 DiT ranks and rank 1 decodes
  K=3: 2 DiT ranks (steps 0-1, 2-3) + a decoder rank
  K=4: 4 DiT ranks (one step each), rank 3 also decodes
  K=5: 4 DiT ranks (one step each) + a decoder rank (the official real-time layout)
Rank 0 is always DiT rank 0: it reads the audio, draws the noise and hands out the chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

from avatars.liveavatar.block_layout import DENOISING_STEPS
from avatars.liveavatar.schedule import STEP_CHOICES

__all__ = ["RankLayout"]

_DIT_RANKS = (1, 2, 4)  # divisors of the 4 denoising steps


@dataclass(frozen=True)
class RankLayout:
    """dit_ranks: ranks 0..dit_ranks-1 denoise; decoder_rank: dit_ranks (its own rank) or dit_ranks - 1."""

    dit_ranks: int
    decoder_rank: int

    def __post_init__(self) -> None:
        if self.dit_ranks not in _DIT_RANKS:
            raise ValueError(f"the DiT ranks must be 1, 2 or 4 (each owns 4/N steps), got {self.dit_ranks}")
        if self.decoder_rank not in (self.dit_ranks - 1, self.dit_ranks):
            raise ValueError(f"the decoder runs on rank {self.dit_ranks - 1} or {self.dit_ranks}")
        if self.world_size < 2:
            raise ValueError("a pipeline needs at least 2 processes; run one process without torchrun")

    @classmethod
    def for_world(cls, world_size: int, decoder_on_last_dit: bool = False) -> RankLayout:
        """The mapping of the module docstring for K = `world_size` processes."""
        if world_size == 2:
            return cls(2, 1) if decoder_on_last_dit else cls(1, 1)
        if world_size == 3 and not decoder_on_last_dit:
            return cls(2, 2)
        if world_size == 4:
            return cls(4, 3)
        if world_size == 5 and not decoder_on_last_dit:
            return cls(4, 4)
        raise ValueError(
            f"cannot lay out the pipeline on {world_size} processes"
            f"{' with the decoder on the last DiT rank' if decoder_on_last_dit else ''}: use 2, 3 or 5 "
            "(1, 2 or 4 DiT ranks plus a decoder rank), or 2 or 4 with the decoder on the last DiT rank"
        )

    @property
    def world_size(self) -> int:
        return max(self.dit_ranks, self.decoder_rank + 1)

    @property
    def last_dit(self) -> int:
        return self.dit_ranks - 1

    @property
    def decoder_shared(self) -> bool:
        """Whether the last DiT rank decodes too."""
        return self.decoder_rank == self.last_dit

    @property
    def stages(self) -> int:
        """Pipeline stages a block passes through: the DiT ranks, plus the decoder when it has its own rank."""
        return self.world_size

    def upstream(self, rank: int) -> int:
        """The rank that sends `rank` its work (runs, blocks, the shutdown)."""
        if not 0 < rank < self.world_size:
            raise ValueError(
                f"rank {rank} gets no work down the pipeline (ranks 1..{self.world_size - 1} do)"
            )
        return self.last_dit if rank == self.decoder_rank and not self.decoder_shared else rank - 1

    def downstream(self, rank: int) -> int | None:
        """The rank `rank` passes work on to; None for the stage that decodes (nothing goes further)."""
        if rank < self.last_dit:
            return rank + 1
        if rank == self.last_dit and not self.decoder_shared:
            return self.decoder_rank
        return None

    def check_steps(self, steps: int) -> None:
        """ValueError, in the user's terms, when `steps` denoising steps cannot be shared equally by the DiT ranks."""
        if steps % self.dit_ranks:
            here = " or ".join(str(n) for n in STEP_CHOICES if n % self.dit_ranks == 0)
            ranks = " or ".join(str(n) for n in _DIT_RANKS if steps % n == 0)
            raise ValueError(
                f"steps: {steps} denoising steps cannot be split over {self.dit_ranks} DiT ranks (each owns the same "
                f"number of steps); choose {here} steps on this layout, or run {steps} steps on {ranks} DiT rank(s)"
            )

    def steps(self, rank: int, total: int = DENOISING_STEPS) -> range:
        """The denoising steps (= history rings) DiT rank `rank` owns, of a schedule of `total` steps."""
        if not 0 <= rank < self.dit_ranks:
            raise ValueError(f"rank {rank} is not a DiT rank (0..{self.last_dit})")
        self.check_steps(total)
        per_rank = total // self.dit_ranks
        return range(rank * per_rank, (rank + 1) * per_rank)
