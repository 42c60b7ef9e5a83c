"""ZeroGPU, as far as it can run off a Space: the real `spaces` package (0.51.3) installed and off-Space, the
GPU-time formula and the refusal of speech too long for one call, the real model loaded at start-up and never
compiled there, and a call forked the way spaces forks its GPU worker (arguments and every yielded value
pickled across, the pipeline loaded before the fork and used, not loaded again, in the child).

What cannot run here: spaces' on-Space path itself. With SPACES_ZERO_GPU=true, `import spaces` fails without its
device API (SPACES_ZERO_DEVICE_API_URL) and, with one named, on this CPU build of torch (it calls
`torch.version.cuda.startswith`); and its worker moves the packed weights onto a real GPU (docs/app.md)."""

from __future__ import annotations

import math
import multiprocessing
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import spaces
import torch

from app import generation, gpu, models
from app.gpu_time import DEFAULT_MAX_S, ESTIMATED_H200_FPS, H200_SMS, REFERENCE_AREA, START_S, GpuBudget
from app.inputs import COMPARE, ISPA
from app.validation import ValidationError
from tests.fixtures.app_specs import app_spec
from tests.fixtures.paced_backend import PacedBackend


@pytest.mark.filterwarnings("ignore:Error while reading infos from Nvidia driver FS")
def test_off_a_space_spaces_changes_nothing_and_describes_the_h200_slice() -> None:
    def run(x: int) -> int:
        return x

    assert spaces.GPU(duration=lambda x: 10)(run) is run  # the package's own off-Space behaviour
    assert gpu.gpu(duration=lambda x: 10)(run) is run
    assert not gpu.ON_ZERO_GPU
    assert gpu.zero_gpu_card() == gpu.DEFAULT_CARD  # our fallback is spaces' own first entry
    assert generation.run_with_gpu is generation.run_leased


def test_the_gpu_time_formula_and_the_longest_speech_that_fits() -> None:
    slice_ = GpuBudget.for_card(60, 1.0, {})
    assert slice_.reference_rate == pytest.approx(ESTIMATED_H200_FPS / 25 * 60 / H200_SMS)
    assert slice_.max_s == DEFAULT_MAX_S
    area = 512 * 320
    assert slice_.rate(area) == pytest.approx(slice_.reference_rate * REFERENCE_AREA / area)
    for runs in (1, 2):
        for budget in (slice_, GpuBudget.for_card(188, 1.5, {})):
            assert budget.seconds(10.0, runs, area) == math.ceil(START_S + runs * 10.0 / budget.rate(area))
            longest = budget.longest_speech_s(runs, area)
            assert budget.seconds(longest, runs, area) * budget.duration_factor <= budget.max_s
            assert budget.seconds(longest + 0.1, runs, area) * budget.duration_factor > budget.max_s - 1
            budget.check(longest, runs, area, "512×320")
            with pytest.raises(ValidationError, match=rf"longest speech that fits is {longest:.1f} s"):
                budget.check(longest + 0.2, runs, area, "512×320")
    tuned = GpuBudget.for_card(60, 1.0, {"ISPA_GPU_RATE": "1.0", "ISPA_GPU_MAX_SECONDS": "120"})
    assert (tuned.reference_rate, tuned.max_s) == (1.0, 120.0)
    for bad in ("0", "-1", "fast", "nan"):
        with pytest.raises(ValueError, match="ISPA_GPU_RATE must be a positive number"):
            GpuBudget.for_card(60, 1.0, {"ISPA_GPU_RATE": bad})


def request(tmp_path: Path, examples_dir: Path, seconds: float, policy: str = ISPA, size: str = "64×64 area"):
    audio, rate = sf.read(examples_dir / "fashion_blogger.wav", dtype="float32")
    speech = tmp_path / "speech.wav"
    sf.write(speech, audio[: round(seconds * rate)], rate)
    return app_spec(PacedBackend(None), examples_dir, speech, policy=policy, size=size)


class OnGpu:
    device = torch.device("cuda")


def test_speech_too_long_for_one_call_is_refused_before_the_call(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, examples_dir: Path
) -> None:
    monkeypatch.setattr(generation, "gpu_budget", lambda: GpuBudget(reference_rate=0.001, max_s=60))
    spec = request(tmp_path, examples_dir, 2.0, COMPARE)
    generation.check_gpu_time(spec, OnGpu())  # off ZeroGPU nothing is refused
    monkeypatch.setattr(generation, "ON_ZERO_GPU", True)
    generation.check_gpu_time(spec, PacedBackend(None))  # a model on the CPU spends no GPU time
    with pytest.raises(
        ValidationError, match=r"Speech: 2\.0 s is too long for one ZeroGPU call .* Full and the ISPA"
    ):
        generation.check_gpu_time(spec, OnGpu())
    # What spaces would ask for never exceeds a call, whatever the speech.
    assert generation.gpu_seconds(spec, "14b", "s", False) == 60


def test_on_zero_gpu_the_real_model_loads_at_start_up_uncompiled(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[tuple[str, str, bool | None]] = []

    def fake_load(name: str, *, fp8: bool, device: torch.device, compile_regions: bool | None) -> object:
        loads.append((name, device.type, compile_regions))
        return object()

    monkeypatch.setattr(models, "_pool", None)
    monkeypatch.setattr(models, "load_pipeline", fake_load)
    monkeypatch.setattr(models, "model_availability", lambda: {"tiny": None, "14b": None})
    monkeypatch.setenv("ISPA_COMPILE", "1")
    models.preload_for_zero_gpu()
    assert loads == []  # off ZeroGPU the app starts without loading anything
    monkeypatch.setattr(models, "ON_ZERO_GPU", True)
    models.preload_for_zero_gpu()
    assert loads == [("14b", "cuda", False)]


def forked_call(
    fn: Callable[..., Iterator[Any]], duration: Callable[..., int]
) -> Callable[..., Iterator[Any]]:
    """What spaces' generator wrapper does with a call, minus the GPU: ask the duration with the call's
    arguments, then run the generator in a forked process, arguments and yields pickled through queues."""
    context = multiprocessing.get_context("fork")

    def child(args_queue: Any, results: Any) -> None:
        try:
            for value in fn(*pickle.loads(args_queue.get())):
                results.put(pickle.dumps(("value", value)))
            results.put(pickle.dumps(("end", None)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent as spaces does
            results.put(pickle.dumps(("error", repr(exc))))

    def call(*args: Any) -> Iterator[Any]:
        duration(*args)
        args_queue, results = context.Queue(), context.Queue()
        args_queue.put(pickle.dumps(args))
        process = context.Process(target=child, args=(args_queue, results), daemon=True)
        process.start()
        try:
            while True:
                kind, value = pickle.loads(results.get(timeout=120))
                if kind == "end":
                    return
                if kind == "error":
                    raise AssertionError(value)
                yield value
        finally:
            process.join(10)

    return call


def test_a_call_forked_like_zero_gpus_worker_streams_picklable_outputs_from_the_preloaded_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, examples_dir: Path
) -> None:
    loads = tmp_path / "loads.txt"

    def counted_load(name: str, device: torch.device) -> PacedBackend:
        with loads.open("a") as log:  # appended to by whichever process loads
            log.write(f"{name}\n")
        return PacedBackend(None)

    monkeypatch.setattr(models, "_pool", None)
    monkeypatch.setattr(models, "_load", counted_load)
    models.get_pipeline("tiny")  # loaded in the main process, before any call
    spec = request(tmp_path, examples_dir, 1.5)
    outputs = list(forked_call(generation.run_leased, generation.gpu_seconds)(spec, "tiny", "owner", False))

    assert loads.read_text() == "tiny\n"  # the child used the forked copy
    final = outputs[-1]
    assert "finished" in final.status
    assert any(Path(p).suffix == ".mp4" and Path(p).stat().st_size > 0 for p in final.downloads)
    segments = [o.player_a for o in outputs if isinstance(o.player_a, str)]
    assert segments and all(Path(s).suffix == ".mp4" for s in segments)

    def no_tensor(value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            return False
        if isinstance(value, dict):
            return all(no_tensor(v) for v in value.values())
        if isinstance(value, list | tuple):
            return all(no_tensor(v) for v in value)
        return not isinstance(value, np.ndarray) or value.dtype != object

    assert all(no_tensor(o.as_list()) for o in outputs)
