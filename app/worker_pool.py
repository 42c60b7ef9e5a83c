"""Several loaded pipelines, one per device, so a server with several GPUs runs one generation per GPU at once.

Each slot is one device and holds its own copy of every model loaded there (loaded on the slot's first run of
that model); a run leases a free slot for its whole length (compare mode's two runs share one slot) and gives
it back when its generator ends, however it ends. Gradio's concurrency limit for generation equals the pool's
size, so a request never waits here in normal use; it waits in Gradio's queue, which tells it its position.

Which devices, read once when the app starts (`devices_from_env`):
- `ISPA_DEVICES="cuda:0,cuda:2"`: exactly these, one slot each ("cpu" may be listed more than once, a CUDA
  device only once);
- else `ISPA_POOL_SIZE=N`: the first N visible GPUs, or N CPU slots on a machine without CUDA;
- else every visible GPU (`CUDA_VISIBLE_DEVICES` narrows them), or one CPU slot without CUDA.
On ZeroGPU there is always one slot: the Space lends one GPU per request.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from app.validation import ValidationError

DEVICES_ENV = "ISPA_DEVICES"
POOL_SIZE_ENV = "ISPA_POOL_SIZE"
LEASE_WAIT_SECONDS = 60.0  # a stopped run's generator may take a moment to close and give its slot back

P = TypeVar("P")


def devices_from_env(
    env: Mapping[str, str], cuda_devices: int, on_zero_gpu: bool = False
) -> list[torch.device]:
    """The pool's devices from `ISPA_DEVICES` / `ISPA_POOL_SIZE` (see the module), checked against the
    `cuda_devices` visible GPUs; a `ValueError` naming the variable when a value cannot be used."""
    if on_zero_gpu:
        return [torch.device("cuda")]
    listed = env.get(DEVICES_ENV, "").strip()
    if listed:
        return _listed_devices(listed, cuda_devices)
    size_text = env.get(POOL_SIZE_ENV, "").strip()
    if size_text:
        if not size_text.isdigit() or int(size_text) < 1:
            raise ValueError(f"{POOL_SIZE_ENV} must be a whole number of at least 1, got {size_text!r}.")
        size = int(size_text)
        if cuda_devices == 0:
            return [torch.device("cpu")] * size
        if size > cuda_devices:
            raise ValueError(
                f"{POOL_SIZE_ENV}={size} asks for more GPUs than the {cuda_devices} visible here."
            )
        return [torch.device("cuda", i) for i in range(size)]
    if cuda_devices == 0:
        return [torch.device("cpu")]
    return [torch.device("cuda", i) for i in range(cuda_devices)]


def _listed_devices(listed: str, cuda_devices: int) -> list[torch.device]:
    devices = []
    for name in (part.strip() for part in listed.split(",")):
        if name == "cpu":
            devices.append(torch.device("cpu"))
            continue
        prefix, _, index = name.partition(":")
        if prefix != "cuda" or not index.isdigit():
            raise ValueError(
                f"{DEVICES_ENV}: {name!r} is not a device; write 'cpu' or 'cuda:N', comma-separated."
            )
        if int(index) >= cuda_devices:
            raise ValueError(f"{DEVICES_ENV}: {name} is not one of the {cuda_devices} GPUs visible here.")
        device = torch.device("cuda", int(index))
        if device in devices:
            raise ValueError(f"{DEVICES_ENV}: {name} is listed twice; each GPU holds one slot.")
        devices.append(device)
    return devices


@dataclass
class _Slot(Generic[P]):
    device: torch.device
    pipelines: dict[str, P] = field(default_factory=dict)
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    busy: bool = False


class PipelinePool(Generic[P]):
    """Slots of loaded pipelines; `load(model, device)` builds one. Thread-safe."""

    def __init__(self, devices: list[torch.device], load: Callable[[str, torch.device], P]) -> None:
        if not devices:
            raise ValueError("a pipeline pool needs at least one device")
        self._slots = [_Slot[P](device) for device in devices]
        self._load = load
        self._free = threading.Condition()

    @property
    def size(self) -> int:
        return len(self._slots)

    @property
    def devices(self) -> list[torch.device]:
        return [slot.device for slot in self._slots]

    def busy(self) -> int:
        with self._free:
            return sum(slot.busy for slot in self._slots)

    def pipeline(self, model: str) -> P:
        """The first slot's pipeline of `model` (loaded on first use), for what every copy shares: its sizes,
        sample rate and label. Running on it needs a `lease`."""
        return self._loaded(self._slots[0], model)

    @contextlib.contextmanager
    def lease(self, model: str, wait_seconds: float = LEASE_WAIT_SECONDS) -> Iterator[P]:
        """A free slot's pipeline of `model`, held until the block ends. Prefers a slot that already holds the
        model; waits for one to free up, and says so if none does within `wait_seconds`."""
        with self._free:
            if not self._free.wait_for(lambda: any(not s.busy for s in self._slots), timeout=wait_seconds):
                raise ValidationError(
                    f"All {self.size} generation slots are still busy; please try again in a moment."
                )
            free = [slot for slot in self._slots if not slot.busy]
            slot = next((s for s in free if model in s.pipelines), free[0])
            slot.busy = True
        try:
            yield self._loaded(slot, model)
        finally:
            with self._free:
                slot.busy = False
                self._free.notify()

    def _loaded(self, slot: _Slot[P], model: str) -> P:
        with slot.load_lock:  # slots load in parallel; one slot loads a model once
            if model not in slot.pipelines:
                slot.pipelines[model] = self._load(model, slot.device)
            return slot.pipelines[model]


def on_device(device: torch.device, chunks: Iterator[P]) -> Iterator[P]:
    """`chunks`, each step run with `device` as the thread's current CUDA device (Gradio may resume a generator
    on any worker thread, and kernels that launch on the current device must find the run's GPU there)."""
    if device.type != "cuda":
        yield from chunks
        return
    try:
        while True:
            with torch.cuda.device(device):
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
