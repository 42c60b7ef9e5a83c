"""The app's models: which ones this machine can run, and each loaded once per process on first use.

Nothing is loaded at import time, so the app starts at once and a machine without a GPU or weights still
serves the tiny test model. With several devices (`app.worker_pool`) each one holds its own copy of a model.
Under torchrun (`app.serve_on_ranks`) the pool is one slot, the pipeline over every rank, serving one model. The
app sees every model through `avatars.base.AvatarBackend` only.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from functools import lru_cache

import torch

from app import weights_on_start
from app.gpu import ON_ZERO_GPU
from app.gpu_sizes import sizes_for_gpu
from app.validation import ValidationError
from app.worker_pool import PipelinePool, devices_from_env
from avatars.base import AvatarBackend
from avatars.liveavatar.loading import available_models, load_pipeline

logger = logging.getLogger(__name__)

TEST_MODEL = "tiny"
REAL_MODEL = "14b"
MODEL_LABELS = {TEST_MODEL: "Tiny test model (untrained, CPU)", REAL_MODEL: "LiveAvatar 14B"}
FP8_ENV = "ISPA_FP8"  # "1": load the 14B DiT's linear layers in FP8 (about half the weight memory)

_pool_lock = threading.Lock()
_pool: PipelinePool[AvatarBackend] | None = None
_only: tuple[str, str] | None = (
    None  # (the one model served, why no other is) when one backend serves all runs
)


def model_availability() -> dict[str, str | None]:
    """Model name -> None when it can run here, else the reason it cannot (a background download's progress
    while the 14B weights are fetched)."""
    found = _models_found()
    status = weights_on_start.download_status()
    if status is not None and status.state == "ready" and found.get(REAL_MODEL) is not None:
        _models_found.cache_clear()  # the weights arrived: ask again, once
        found = _models_found()
    if (note := weights_on_start.download_note()) is not None:
        found = {**found, REAL_MODEL: hide_paths(note)}
    if _only is None:
        return found
    served, elsewhere = _only
    return {
        name: elsewhere if name != served and reason is None else reason for name, reason in found.items()
    }


@lru_cache(maxsize=1)
def _models_found() -> dict[str, str | None]:
    """What this machine can run, asked once per process."""
    found = available_models(gpu=weights_on_start.gpu_present())
    return {name: hide_paths(reason) if reason else None for name, reason in found.items()}


def hide_paths(text: str) -> str:
    """Replace absolute file paths with '…': messages reach the browser, server paths should not."""
    return re.sub(r"(?<![\w.])(?:~|/)[^\s'\"()<>,;]*(?:/[^\s'\"()<>,;]*)+", "…", text)


def default_model() -> str:
    """The real model when it can run here, else the test model."""
    return REAL_MODEL if model_availability().get(REAL_MODEL, "unknown") is None else TEST_MODEL


def check_model(name: str) -> str:
    """The model name if this machine can run it; a `ValidationError` naming the reason otherwise."""
    availability = model_availability()
    if not isinstance(name, str) or name not in availability:
        raise ValidationError(f"Unknown model {name!r}; choose one of: {', '.join(availability)}.")
    reason = availability[name]
    if reason is not None:
        raise ValidationError(f"The {MODEL_LABELS.get(name, name)} model is not available here: {reason}")
    return name


def pipeline_pool() -> PipelinePool[AvatarBackend]:
    """The process's pool of pipelines, its devices read from the environment on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            cuda_devices = 0 if ON_ZERO_GPU else torch.cuda.device_count()
            _pool = PipelinePool(devices_from_env(os.environ, cuda_devices, ON_ZERO_GPU), _load)
        return _pool


def serve_only(model: str, backend: AvatarBackend, why_no_other: str) -> None:
    """Send every run to `backend`, which serves `model` only (e.g. the pipeline over every rank under torchrun):
    a pool of one slot; the other models are listed as unavailable, `why_no_other` saying why."""
    global _pool, _only

    def served(name: str, device: torch.device) -> AvatarBackend:
        check_model(name)  # the other models are refused there, with the reason
        return backend

    with _pool_lock:
        _only = (model, why_no_other)
        _pool = PipelinePool([backend.device], served)


def _load(name: str, device: torch.device) -> AvatarBackend:
    if name == REAL_MODEL and device.type != "cuda":
        raise ValidationError(
            f"The {MODEL_LABELS[name]} model needs a GPU; this generation slot is on {device}."
        )
    # torch.compile does not work in ZeroGPU's forked workers: never there, whatever ISPA_COMPILE says.
    compile_dit = False if ON_ZERO_GPU else None
    return load_pipeline(
        name, fp8=name == REAL_MODEL and wants_fp8(), device=device, compile_regions=compile_dit
    )


def preload_for_zero_gpu() -> None:
    """On ZeroGPU, load the real model now, in the main process at start-up: spaces intercepts its `.to("cuda")`
    and packs the weights when the app launches, and each call's forked worker gets them moved onto its GPU.
    Loaded later (in a worker), the 14B would be read from disk again on every call. Elsewhere nothing."""
    if ON_ZERO_GPU and model_availability().get(REAL_MODEL, "unknown") is None:
        logger.info("ZeroGPU: loading %s before the app launches", MODEL_LABELS[REAL_MODEL])
        get_pipeline(REAL_MODEL)


def get_pipeline(name: str) -> AvatarBackend:
    """A loaded pipeline for `name` (the pool's first copy), loading it on first use; for what every copy
    shares (sizes, sample rate, label). A run takes a free copy with `pipeline_pool().lease(name)`."""
    return pipeline_pool().pipeline(check_model(name))


def usable_sizes(pipe: AvatarBackend) -> tuple[list[tuple[str, int]], list[str]]:
    """The sizes of `pipe` its device can run (all of them off a GPU), and why any others cannot."""
    return sizes_for_gpu(pipe)


def wants_fp8() -> bool:
    return os.environ.get(FP8_ENV, "") == "1"
