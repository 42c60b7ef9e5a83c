"""The suite's summary.json, rewritten after every measurement so a timeout, a crash or SIGTERM keeps what was taken.

Every stage is in the file from the start: "skipped" (not reached) until it starts, "failed" while it runs (so a
process killed mid-stage still leaves a valid contract), then "ok", "failed" with its error, or "skipped" with why.
Figures that have a target in the issue's table are printed against it the moment they are recorded, and figures
that have a model's estimate (`estimates`, "stage.key" → {"value", "basis"}) beside that estimate.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

NOT_REACHED = "not reached (an earlier stage is still running, or the run stopped before it)"
RUNNING = "did not finish: still running, or the process was stopped inside this stage"


class StageSkipped(Exception):  # noqa: N818 - raised to skip, not an error
    """Raised by a stage that cannot run here; its message is the reason recorded."""


@dataclass(frozen=True)
class Target:
    """A figure the issue sets a target for: `figure` is "stage.key", compared with `op` ("≥", "≤", "measured")."""

    figure: str
    label: str
    op: str
    value: float | None = None
    goal: float | None = None

    def verdict(self, value: float | None) -> str:
        if value is None:
            return "not measured"
        if self.op == "measured":
            return "measured"
        met = value >= self.value if self.op == "≥" else value <= self.value
        return "met" if met else "not met"

    def describe(self) -> str:
        if self.op == "measured":
            return "measured"
        goal = f" (goal {self.goal:g})" if self.goal is not None else ""
        return f"{self.op} {self.value:g}{goal}"


class Recorder:
    """Holds the summary and writes it atomically (temp file + rename) to `out_dir/summary.json` on each change."""

    def __init__(
        self,
        out_dir: Path,
        header: dict[str, Any],
        stages: list[str],
        targets: list[Target],
        estimates: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.path = Path(out_dir) / "summary.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.targets = {t.figure: t for t in targets}
        self.summary: dict[str, Any] = {
            **header,
            "stages": {name: {"status": "skipped", "reason": NOT_REACHED, "figures": {}} for name in stages},
            "targets": [t.__dict__ for t in targets],
            "estimates": dict(estimates or {}),
        }
        self._current: str | None = None
        self.write()

    # ---- writing ---------------------------------------------------------------------------------------------
    def write(self) -> None:
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.summary, indent=1, default=str))
        os.replace(temporary, self.path)

    def record(self, key: str, value: Any) -> None:
        """One figure of the running stage; printed (with its target, if any) and written at once."""
        stage = self._require_stage()
        self.summary["stages"][stage]["figures"][key] = value
        self.write()
        target = self.targets.get(f"{stage}.{key}")
        estimate = self.summary["estimates"].get(f"{stage}.{key}")
        line = f"  {stage}.{key} = {_short(value)}"
        if estimate is not None:
            line = f"  {stage}.{key}: measured {_short(value)}, estimate {_short(estimate['value'])} ({estimate['basis']})"
        if target is not None:
            number = value if isinstance(value, (int, float)) else None
            line += f"   target {target.describe()}: {target.verdict(number)}"
        print(line, flush=True)

    def estimate(self, key: str, value: float, basis: str) -> None:
        """A model's estimate of a figure of the running stage, shown beside the figure once it is measured."""
        stage = self._require_stage()
        self.summary["estimates"][f"{stage}.{key}"] = {"value": value, "basis": basis}
        self.write()

    def append(self, key: str, row: Any) -> None:
        """Append one row (e.g. a streamed block) to a list figure of the running stage."""
        stage = self._require_stage()
        self.summary["stages"][stage]["figures"].setdefault(key, []).append(row)
        self.write()

    def _require_stage(self) -> str:
        if self._current is None:
            raise RuntimeError("figures are recorded inside `recorder.stage(name)`")
        return self._current

    # ---- stages ----------------------------------------------------------------------------------------------
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Run one stage: its exceptions become status "failed" (the suite goes on), StageSkipped "skipped"."""
        self._set_status(name, "failed", error=RUNNING)
        self._current = name
        started = time.perf_counter()
        print(f"== stage {name}", flush=True)
        self.write()
        try:
            yield
        except StageSkipped as skipped:
            self._set_status(name, "skipped", reason=str(skipped))
        except Exception as err:  # noqa: BLE001 - one stage's failure must not cost the others' figures
            self._set_status(
                name, "failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()
            )
            print(f"  stage {name} failed: {type(err).__name__}: {err}", flush=True)
        else:
            self._set_status(name, "ok")
        finally:
            self.summary["stages"][name]["seconds"] = round(time.perf_counter() - started, 3)
            self._current = None
            self.write()

    def _set_status(self, name: str, status: str, **details: str) -> None:
        entry = self.summary["stages"][name]
        for key in ("reason", "error", "traceback"):
            entry.pop(key, None)
        entry.update(status=status, **details)

    def skip(self, name: str, reason: str) -> None:
        self._set_status(name, "skipped", reason=reason)
        self.write()

    def interrupted(self, why: str) -> None:
        """Mark the running stage failed with `why` and write; the figures it already took stay."""
        if self._current is not None:
            self._set_status(self._current, "failed", error=why)
        self.summary["interrupted"] = why
        self.write()


def exit_on_sigterm(recorder: Recorder, on_exit: Callable[[], None] | None = None) -> None:
    """On SIGTERM (what `timeout` sends): write the summary as it stands, then exit with 128 + 15."""

    def handler(signum: int, frame: FrameType | None) -> None:
        recorder.interrupted(f"interrupted by signal {signal.Signals(signum).name}")
        if on_exit is not None:
            on_exit()
        print(f"interrupted: {recorder.path} holds every figure taken so far", flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)
