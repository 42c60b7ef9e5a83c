"""Everything a user hands the Generate button, checked and turned into what the backend takes.

The order of the checks is cheap first (settings and names), then the portrait, then the speech, which may
have to be synthesised from text. Every problem is a `ValidationError` whose message can be shown as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app import tts
from app.validation import (
    Settings,
    ValidationError,
    validate_audio,
    validate_portrait,
    validate_prompt,
    validate_settings,
    validate_tts_text,
)
from avatars.liveavatar.schedule import STEP_CHOICES
from ispa import (
    KV_FORMATS,
    EvictPolicy,
    FullPolicy,
    ISPAPolicy,
    Policy,
    SaliencePolicy,
    WindowPolicy,
    make_policy,
)

ISPA, FULL, COMPARE = "ISPA", "Full", "Compare"
EVICT, WINDOW, SALIENCE = "Evict", "Window", "Salience"
POLICY_CHOICES = (ISPA, FULL, COMPARE)
MODE_RUNS = {ISPA: (ISPA,), FULL: (FULL,)}  # compare mode runs the two policies chosen (`RunSpec.compare`)
DEFAULT_COMPARE = (FULL, ISPA)  # compare mode's default pair: Full first, then ISPA
ENGINE_POLICY = {  # run name -> the engine's policy name
    FULL: FullPolicy.name,
    ISPA: ISPAPolicy.name,
    EVICT: EvictPolicy.name,
    WINDOW: WindowPolicy.name,
    SALIENCE: SaliencePolicy.name,
}
COMPARE_CHOICES = tuple(ENGINE_POLICY)  # what compare mode's "A" and "B" offer
DEFAULT_SIZE = "default"


@dataclass(frozen=True, kw_only=True)
class EngineChoices:
    """The engine panel's values as the page sends them, before any check (numbers may be strings).

    Built by keyword from a handler's named inputs (never from its `locals()`), so the fields are this class's
    own schema: renaming a handler's local variable cannot add, drop or swap one."""

    policy: Any
    k_fraction: Any
    t_warm: Any
    lam: Any
    seed: Any
    size: Any
    model: Any
    kv_format: Any = "bf16"
    refresh_sink: Any = False
    steps: Any = 4
    compare_a: Any = DEFAULT_COMPARE[0]
    compare_b: Any = DEFAULT_COMPARE[1]


@dataclass(frozen=True)
class RunSpec:
    """A checked request: the portrait, the speech (None in live mode: it arrives later) and the settings."""

    portrait: np.ndarray  # [H, W, 3] uint8 RGB
    audio: np.ndarray | None  # mono float32 at the pipeline's sample rate
    audio_source: str  # "audio", "text" or "live"
    speech_seconds: float | None  # None in live mode
    prompt: str
    mode: str  # one of POLICY_CHOICES
    settings: Settings
    size_label: str
    max_area: int
    kv_format: str = "bf16"  # one of ispa.KV_FORMATS: how the KV history is stored
    refresh_sink: bool = False  # prefill the sink again at clip 1 (the official 5-GPU pipeline's behaviour)
    steps: int = 4  # denoising steps: 4 official, 3 or 2 a deviation for speed
    warnings: list[str] = field(default_factory=list)
    compare: tuple[str, str] = DEFAULT_COMPARE  # compare mode's two runs, "A vs B" (names in COMPARE_CHOICES)

    def shown_runs(self) -> tuple[str, ...]:
        """The runs the user sees (players, KV plot): the mode's one, or compare mode's A and B."""
        return self.compare if self.mode == COMPARE else MODE_RUNS[self.mode]

    def policies(self) -> list[tuple[str, Policy]]:
        """(run name, policy) for each run this request makes: the shown ones, and in compare mode a Full run
        after them when neither is Full (each compared run's drift is measured against Full)."""
        settings = self.settings
        runs = self.shown_runs()
        if self.mode == COMPARE and FULL not in runs:
            runs = (*runs, FULL)
        return [
            (
                run,
                make_policy(
                    ENGINE_POLICY[run],
                    k_fraction=settings.k_fraction,
                    t_warm=settings.t_warm,
                    lam=settings.lam,
                ),
            )
            for run in runs
        ]


def check_mode(policy: Any) -> str:
    if not isinstance(policy, str) or policy not in POLICY_CHOICES:
        raise ValidationError(f"The policy must be one of: {', '.join(POLICY_CHOICES)}.")
    return policy


def check_compare(compare_a: Any, compare_b: Any) -> tuple[str, str]:
    """Compare mode's pair: two different names of COMPARE_CHOICES."""
    for label, name in (("A", compare_a), ("B", compare_b)):
        if not isinstance(name, str) or name not in COMPARE_CHOICES:
            raise ValidationError(f"Compare {label} must be one of: {', '.join(COMPARE_CHOICES)}.")
    if compare_a == compare_b:
        raise ValidationError(
            f"Compare A and Compare B must be two different policies (both are {compare_a})."
        )
    return compare_a, compare_b


def check_kv_format(kv_format: Any) -> str:
    if not isinstance(kv_format, str) or kv_format not in KV_FORMATS:
        raise ValidationError(f"The KV-cache format must be one of: {', '.join(KV_FORMATS)}.")
    return kv_format


def check_refresh_sink(refresh_sink: Any) -> bool:
    if not isinstance(refresh_sink, bool):
        raise ValidationError("The sink refresh must be on or off (true or false).")
    return refresh_sink


def check_steps(steps: Any) -> int:
    """4 (the official schedule), 3 or 2; the page's dropdown may send the number as a string."""
    if isinstance(steps, str) and steps.strip().isdigit():
        steps = int(steps)
    if isinstance(steps, bool) or steps not in STEP_CHOICES:
        choices = ", ".join(str(n) for n in STEP_CHOICES)
        raise ValidationError(f"The denoising steps must be one of: {choices} (4 is the official schedule).")
    return int(steps)


def choose_size(size: Any, size_choices: Sequence[tuple[str, int]]) -> tuple[str, int]:
    """(label, max_area) for a size label from the dropdown; "default" is the model's first choice."""
    if not size_choices:
        raise ValueError("the pipeline offers no sizes")
    if size in (None, "", DEFAULT_SIZE):
        return size_choices[0]
    for label, area in size_choices:
        if size == label:
            return label, area
    labels = ", ".join(label for label, _ in size_choices)
    raise ValidationError(f"The size must be '{DEFAULT_SIZE}' or one of: {labels}.")


def prepare_run(
    *,
    portrait: str | Path | None,
    audio: str | Path | None,
    text: str | None,
    prompt: Any,
    policy: Any,
    k_fraction: Any,
    t_warm: Any,
    lam: Any,
    seed: Any,
    size: Any,
    size_choices: Sequence[tuple[str, int]],
    sample_rate: int,
    speech_dir: Path,
    kv_format: Any = "bf16",
    refresh_sink: Any = False,
    steps: Any = 4,
    live: bool = False,
    compare_a: Any = DEFAULT_COMPARE[0],
    compare_b: Any = DEFAULT_COMPARE[1],
) -> RunSpec:
    """Check every input; speech comes from the audio file, else from `text` (synthesised into `speech_dir`),
    and in `live` mode from the microphone later on."""
    mode = check_mode(policy)
    compare = check_compare(compare_a, compare_b) if mode == COMPARE else DEFAULT_COMPARE
    prompt_check = validate_prompt(prompt)
    settings = validate_settings(k_fraction=k_fraction, t_warm=t_warm, lam=lam, seed=seed)
    size_label, max_area = choose_size(size, size_choices)
    kv_format = check_kv_format(kv_format)
    refresh_sink = check_refresh_sink(refresh_sink)
    steps = check_steps(steps)
    portrait_check = validate_portrait(portrait)
    notes = [*prompt_check.warnings, *settings.warnings, *portrait_check.warnings]
    samples, source = None, "live"
    if not live:
        samples, source, speech_notes = _speech(audio, text, sample_rate, speech_dir)
        notes += speech_notes
    return RunSpec(
        portrait=portrait_check.image,
        audio=samples,
        audio_source=source,
        speech_seconds=None if samples is None else len(samples) / sample_rate,
        prompt=prompt_check.text,
        mode=mode,
        settings=settings,
        size_label=size_label,
        max_area=max_area,
        kv_format=kv_format,
        refresh_sink=refresh_sink,
        steps=steps,
        warnings=notes,
        compare=compare,
    )


def _speech(
    audio: str | Path | None, text: Any, sample_rate: int, speech_dir: Path
) -> tuple[np.ndarray, str, list[str]]:
    has_text = not (text is None or (isinstance(text, str) and not text.strip()))
    if audio is not None:
        check = validate_audio(audio, target_rate=sample_rate)
        notes = ["Both audio and text were given; the audio was used."] if has_text else []
        return check.samples, "audio", [*check.warnings, *notes]
    if has_text:
        cleaned = validate_tts_text(text)
        try:
            speech = tts.synthesize(cleaned.text, speech_dir)
        except tts.TextToSpeechError as exc:
            raise ValidationError(str(exc)) from None
        check = validate_audio((speech.sample_rate, speech.samples), target_rate=sample_rate)
        return check.samples, "text", [*cleaned.warnings, *check.warnings]
    raise ValidationError("Please provide the driving audio: upload or record it, or type text to speak.")
