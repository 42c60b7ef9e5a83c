"""The model's thread: steps come through in order with the time each was made, the producer's error is raised
in the consumer, a timeout returns nothing, and a stop ends the producer between steps."""

from __future__ import annotations

import threading

import pytest

from app.prefetch import AHEAD, Prefetch


def test_steps_arrive_in_order_stamped_then_the_end() -> None:
    ticks = iter(range(100))
    production = Prefetch(iter("abc"), clock=lambda: next(ticks), on_stop=lambda: None)
    seen = []
    while (made := production.take(timeout=None)) is not None:
        seen.append(made)
    assert [step for _, step in seen] == ["a", "b", "c"]
    assert [t for t, _ in seen] == sorted(t for t, _ in seen)
    assert production.take(timeout=None) is None  # and stays over


def test_an_error_reaches_the_consumer_and_a_wait_can_time_out() -> None:
    gate = threading.Event()

    def steps():
        yield 1
        gate.wait()
        raise RuntimeError("the model broke")

    production = Prefetch(steps(), clock=lambda: 0.0, on_stop=lambda: None)
    assert production.take(timeout=None) == (0.0, 1)
    assert production.take(timeout=0.01) is False
    gate.set()
    with pytest.raises(RuntimeError, match="the model broke"):
        production.take(timeout=None)


def test_a_stop_asks_the_steps_to_end_and_waits_for_the_thread() -> None:
    cancelled = threading.Event()

    def steps():
        while not cancelled.is_set():
            yield 0
            cancelled.wait(0.01)

    production = Prefetch(steps(), clock=lambda: 0.0, on_stop=cancelled.set)
    assert production.take(timeout=None)
    assert production.stop() is True and cancelled.is_set()


def test_the_model_runs_at_most_a_few_steps_ahead_and_a_stop_frees_it_when_nobody_takes_them() -> None:
    made = []

    def steps():
        while True:
            made.append(len(made))
            yield made[-1]

    production = Prefetch(steps(), clock=lambda: 0.0, on_stop=lambda: None)
    assert production.take(timeout=None) == (0.0, 0)
    deadline = threading.Event()
    deadline.wait(0.3)
    assert len(made) <= AHEAD + 2  # the queue's steps, one blocked on it, the one taken
    assert production.stop() is True
