"""How `--scale` maps the suite's shapes. `full` is LiveAvatar 14B at 704×384; `tiny` divides token counts and D by
16 and heads and head_dim by 4 (so every stage finishes in seconds on two CPU cores) and streams the tiny test model.

| shape | full | tiny |
|---|---|---|
| attention heads × head_dim | 40 × 128 | 10 × 32 |
| queries (one block) | 3,168 | 198 |
| keys: local (sink + block) / history (3 blocks) / both | 5,808 / 9,504 / 15,312 | 363 / 594 / 957 |
| statistics and absorb D; layers absorbed | 5,120; 40 | 320; 4 |
| GEMM ceiling M × K × N (FFN up) | 3,168 × 5,120 × 13,824 | 198 × 320 × 864 |
| copy bandwidth buffer | 2 GiB | 8 MiB |
| streaming model, video, blocks, warmup | 14B random weights, 704×384, 8, 12 latent frames | tiny model, 64×64, 3, 6 latent frames |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    name: str
    heads: int
    head_dim: int
    queries: int
    local_keys: int  # sink (2,640 at full) + one block
    history_keys: int  # three history blocks of the ring
    dim: int  # the model width D (statistics, absorb, Cholesky)
    layers: int  # layers absorbed
    ffn_dim: int
    copy_bytes: int
    stream_model: str  # bench/streaming.py's --model
    stream_max_area: int | None  # video pixels (None: the model's default size)
    stream_blocks: int
    stream_t_warm: int
    repeats: int  # timed runs per measurement (the median is kept)

    @property
    def key_lengths(self) -> tuple[int, ...]:
        """Lk for the accuracy check: local only (an L-layer), the history ring, local + history (one plain call)."""
        return (self.local_keys, self.history_keys, self.local_keys + self.history_keys)

    @property
    def shapes(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, int)}


FULL = Scale(
    name="full",
    heads=40,
    head_dim=128,
    queries=3168,
    local_keys=5808,
    history_keys=9504,
    dim=5120,
    layers=40,
    ffn_dim=13824,
    copy_bytes=2 << 30,
    stream_model="14b",
    stream_max_area=None,
    stream_blocks=8,
    stream_t_warm=12,
    repeats=5,
)

TINY = Scale(
    name="tiny",
    heads=10,
    head_dim=32,
    queries=198,
    local_keys=363,
    history_keys=594,
    dim=320,
    layers=4,
    ffn_dim=864,
    copy_bytes=8 << 20,
    stream_model="tiny",
    stream_max_area=64 * 64,
    stream_blocks=3,
    stream_t_warm=6,
    repeats=3,
)

SCALES = {scale.name: scale for scale in (TINY, FULL)}
