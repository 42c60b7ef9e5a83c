"""The pool of pipelines: which devices it takes from the environment, and how runs lease its slots."""

from __future__ import annotations

import threading

import pytest
import torch

from app.validation import ValidationError
from app.worker_pool import PipelinePool, devices_from_env, on_device

CPU = torch.device("cpu")


def cuda(i: int) -> torch.device:
    return torch.device("cuda", i)


@pytest.mark.parametrize(
    ("env", "gpus", "expected"),
    [
        ({}, 0, [CPU]),
        ({}, 1, [cuda(0)]),
        ({}, 3, [cuda(0), cuda(1), cuda(2)]),
        ({"ISPA_POOL_SIZE": "2"}, 0, [CPU, CPU]),
        ({"ISPA_POOL_SIZE": "2"}, 4, [cuda(0), cuda(1)]),
        ({"ISPA_DEVICES": "cuda:1, cuda:3"}, 4, [cuda(1), cuda(3)]),
        ({"ISPA_DEVICES": "cpu,cpu", "ISPA_POOL_SIZE": "5"}, 0, [CPU, CPU]),  # the list wins
    ],
)
def test_the_pool_takes_its_devices_from_the_environment(env, gpus, expected) -> None:
    assert devices_from_env(env, gpus) == expected


def test_zero_gpu_always_gets_one_slot() -> None:
    assert devices_from_env({"ISPA_POOL_SIZE": "4"}, 0, on_zero_gpu=True) == [torch.device("cuda")]


@pytest.mark.parametrize(
    ("env", "gpus", "message"),
    [
        ({"ISPA_POOL_SIZE": "0"}, 0, "ISPA_POOL_SIZE must be a whole number of at least 1, got '0'."),
        ({"ISPA_POOL_SIZE": "two"}, 2, "ISPA_POOL_SIZE must be a whole number of at least 1, got 'two'."),
        ({"ISPA_POOL_SIZE": "3"}, 2, "ISPA_POOL_SIZE=3 asks for more GPUs than the 2 visible here."),
        ({"ISPA_DEVICES": "gpu0"}, 2, "ISPA_DEVICES: 'gpu0' is not a device; write 'cpu' or 'cuda:N'"),
        ({"ISPA_DEVICES": "cuda:2"}, 2, "ISPA_DEVICES: cuda:2 is not one of the 2 GPUs visible here."),
        ({"ISPA_DEVICES": "cuda:0,cuda:0"}, 2, "ISPA_DEVICES: cuda:0 is listed twice"),
    ],
)
def test_unusable_settings_are_refused_naming_the_variable(env, gpus, message) -> None:
    with pytest.raises(ValueError) as caught:
        devices_from_env(env, gpus)
    assert str(caught.value).startswith(message)


class Loads:
    """A stand-in loader that records (model, device) and returns a fresh object per load."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.device]] = []

    def __call__(self, model: str, device: torch.device) -> tuple[str, torch.device, int]:
        self.calls.append((model, device))
        return (model, device, len(self.calls))


def test_each_lease_takes_a_free_slot_and_gives_it_back() -> None:
    loads = Loads()
    pool = PipelinePool([CPU, CPU], loads)
    with pool.lease("tiny") as one:
        assert pool.busy() == 1
        with pool.lease("tiny") as two:
            assert pool.busy() == 2 and one is not two  # two copies, one per slot
        with pool.lease("tiny") as again:
            assert again is two  # the freed slot, its model already loaded
    assert pool.busy() == 0 and len(loads.calls) == 2
    assert pool.pipeline("tiny") is one  # the first slot's copy, loaded once


def test_a_lease_prefers_a_slot_that_already_holds_the_model() -> None:
    pool = PipelinePool([CPU, CPU], Loads())
    with pool.lease("tiny"), pool.lease("14b") as big:  # slot 0 holds tiny, slot 1 holds 14b
        pass
    with pool.lease("14b") as again:
        assert again is big


def test_a_failed_run_gives_its_slot_back() -> None:
    pool = PipelinePool([CPU], Loads())
    with pytest.raises(RuntimeError), pool.lease("tiny"):
        raise RuntimeError("the run failed")
    with pool.lease("tiny"):
        assert pool.busy() == 1


def test_a_lease_waits_for_a_slot_and_says_so_when_none_frees() -> None:
    pool = PipelinePool([CPU], Loads())
    got: list[object] = []

    def second_run() -> None:
        with pool.lease("tiny") as pipe:
            got.append(pipe)

    with pool.lease("tiny") as first:
        busy = pytest.raises(ValidationError, match="All 1 generation slots are still busy")
        with busy, pool.lease("tiny", wait_seconds=0.0):
            pass
        waiter = threading.Thread(target=second_run)
        waiter.start()  # with one slot it can only get the pipeline once the first run gives it back
    waiter.join(timeout=30)
    assert got == [first]


def test_on_device_passes_chunks_through_and_closes_what_it_wraps() -> None:
    closed = []

    def chunks():
        try:
            yield from range(5)
        finally:
            closed.append(True)

    wrapped = on_device(CPU, chunks())
    assert [next(wrapped), next(wrapped)] == [0, 1]
    wrapped.close()
    assert closed == [True]
