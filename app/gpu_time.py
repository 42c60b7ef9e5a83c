"""How much GPU time one request asks ZeroGPU for, and which speech is too long for one call.

ZeroGPU lends the GPU per call of a `spaces.GPU(duration=...)` function; `duration` may be a callable of the
call's arguments, asked before the call (spaces 0.51.3, `spaces.zero.wrappers`). The request is

    seconds = ceil(START_S + runs × speech_s / rate),   rate = REFERENCE_RATE × REFERENCE_AREA / area

- START_S (45 s, an estimate): forking the GPU worker, moving the packed weights onto the GPU, the encoders and
  the first block's set-up.
- runs: 1, or 2 in compare mode (the runs take turns on one GPU).
- rate: video seconds made per GPU second at the run's size. At the official 720×400 area it is the estimate
  of 10.7 FPS for FP8 + ISPA on a whole H200 (bench/suite/estimates.py; not measured) over the 25 FPS of the
  video, scaled by the card's share of an H200's 132 SMs (spaces reports 60 for the ZeroGPU H200 slice, so
  0.19× real time); other sizes scale by pixel count (an estimate). `ISPA_GPU_RATE` overrides it once measured.
- The platform grants at most MAX_S per call: 300 s by default (a ZeroGPU maintainer's answer: "5 minutes is
  the maximum time that can be requested at once"; 900 s was refused as an illegal duration), or
  `ISPA_GPU_MAX_SECONDS`. spaces multiplies the request by the card's `duration_factor` (1.5 on the RTX PRO 6000
  Blackwell) before sending it, so the request must fit MAX_S / factor.

Speech longer than what fits is refused before any GPU time is asked, naming the longest length that fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from app.validation import ValidationError

START_S = 45.0
REFERENCE_AREA = 720 * 400
ESTIMATED_H200_FPS = 10.7
H200_SMS = 132
VIDEO_FPS = 25.0
DEFAULT_MAX_S = 300.0
RATE_ENV = "ISPA_GPU_RATE"
MAX_ENV = "ISPA_GPU_MAX_SECONDS"


@dataclass(frozen=True)
class GpuBudget:
    """The formula's terms for one card (see the module)."""

    reference_rate: float  # video seconds per GPU second at REFERENCE_AREA
    max_s: float = DEFAULT_MAX_S
    duration_factor: float = 1.0
    start_s: float = START_S

    @classmethod
    def for_card(cls, sm_count: int, duration_factor: float, env: Mapping[str, str]) -> GpuBudget:
        """The budget on a card with `sm_count` SMs whose requests spaces scales by `duration_factor`; the
        environment may set the rate and the maximum (a `ValueError` naming the variable when unusable)."""
        rate = _positive(env, RATE_ENV, ESTIMATED_H200_FPS / VIDEO_FPS * sm_count / H200_SMS)
        return cls(rate, _positive(env, MAX_ENV, DEFAULT_MAX_S), duration_factor)

    def rate(self, area: int) -> float:
        return self.reference_rate * REFERENCE_AREA / area

    def seconds(self, speech_s: float, runs: int, area: int) -> int:
        """The duration to ask for (before spaces applies the card's factor)."""
        return math.ceil(self.start_s + runs * speech_s / self.rate(area))

    def longest_speech_s(self, runs: int, area: int) -> float:
        """The longest speech one call fits, to a tenth of a second (0 when not even the start-up fits)."""
        spare = self.max_s / self.duration_factor - self.start_s
        return max(0.0, math.floor(spare * self.rate(area) / runs * 10) / 10)

    def check(self, speech_s: float, runs: int, area: int, size_label: str) -> None:
        """Refuse speech that one call cannot hold, in our words."""
        asked = self.seconds(speech_s, runs, area) * self.duration_factor
        if asked <= self.max_s:
            return
        both = "the Full and the ISPA run" if runs == 2 else "one run"
        raise ValidationError(
            f"Speech: {speech_s:.1f} s is too long for one ZeroGPU call at {size_label} with {both}: it would "
            f"ask for {asked:.0f} s of GPU time and a call may take at most {self.max_s:.0f} s. The longest "
            f"speech that fits is {self.longest_speech_s(runs, area):.1f} s; a smaller size or a single run "
            "fits more."
        )


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {text!r}.")
    return value
