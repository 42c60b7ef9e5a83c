"""Many users at once: the app served with a pool of two CPU pipelines of the tiny model runs two clients'
generations side by side, each giving the video a lone run gives; a third client waits in the queue and is told
its place; Stop and Recalibrate reach the run on whichever pipeline holds it."""

from __future__ import annotations

import io
import time
from pathlib import Path

import av
import numpy as np
import pytest
from gradio_client import Client
from gradio_client.utils import Status

from tests.app.test_ui_client import (
    FILES,
    LAYERS,
    REPORT,
    fetch,
    is_step,
    local_cells,
    run,
    speech_clip,
    submit,
)

QUEUE_WAIT_SECONDS = 60.0


@pytest.fixture
def _two_cpu_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ISPA_DEVICES=cpu,cpu`, read by a fresh pool: two generation slots, each with its own tiny pipeline."""
    from app import models

    monkeypatch.setenv("ISPA_DEVICES", "cpu,cpu")
    monkeypatch.setattr(models, "_pool", None)


@pytest.fixture
def pooled_app_url(_two_cpu_slots: None, app_url: str) -> str:
    """The whole app served with two generation slots (the slots are set before the app is built)."""
    return app_url


def decoded_frames(outputs: list[tuple], name: str) -> np.ndarray:
    files = {f["orig_name"]: f for f in outputs[-1][FILES]}
    with av.open(io.BytesIO(fetch(files[f"avatar-{name}.mp4"]["url"]))) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def engine_figures(report: dict, name: str) -> list[tuple]:
    return [
        (c["index"], c["frames"], c["kv_bytes"], tuple(c["l_layers"]), c["event"])
        for c in report["runs"][name]["chunks"]
    ]


def wait_until_queued(job) -> object:
    """The job's status once Gradio has placed it in the queue (or started it)."""
    deadline = time.monotonic() + QUEUE_WAIT_SECONDS
    status = job.status()
    while status.code in (Status.STARTING, Status.JOINING_QUEUE) and time.monotonic() < deadline:
        time.sleep(0.05)
        status = job.status()
    return status


def test_two_clients_run_at_once_and_a_third_waits_told_its_place(
    pooled_app_url: str, examples_dir: Path, tmp_path: Path
) -> None:
    from app.models import pipeline_pool

    portrait = examples_dir / "fashion_blogger.jpg"
    short, long = speech_clip(examples_dir, tmp_path, 2.0), speech_clip(examples_dir, tmp_path, 5.0)
    users = [Client(pooled_app_url, verbose=False, download_files=False) for _ in range(4)]
    try:
        first, second, third, alone = users
        job_a = submit(first, portrait, short, seed=3)
        token_b = "many-users-second-client-token-0123"
        job_b = submit(second, portrait, long, seed=4, owner_token=token_b)
        next(job_a)
        next(job_b)
        # Both streams have started while the first is still running: they run side by side, one per slot.
        assert not job_a.done() and pipeline_pool().busy() == 2

        job_c = submit(third, portrait, short, seed=3)
        queued = wait_until_queued(job_c)
        assert queued.code == Status.IN_QUEUE and queued.rank == 0 and queued.queue_size == 1

        # Recalibrate, then Stop, from the second client reach its run and nobody else's.
        recalibrated = stopped = None
        for out in filter(is_step, job_b):
            if recalibrated is None and local_cells(out[LAYERS]) > 0:
                second.predict(token_b, api_name="/recalibrate")
                recalibrated = True
            elif stopped is None and "recalibrations: 1" in out[LAYERS]:
                stopped = second.predict(token_b, api_name="/stop")
        assert recalibrated and stopped is not None
        b_events = [c["event"] for c in stopped[1]["runs"]["ISPA"]["chunks"]]
        assert stopped[1]["stopped_early"] and b_events.count("recalibration_started") == 1

        job_a.result()
        job_c.result()
        outputs_a, outputs_c = job_a.outputs(), job_c.outputs()
        report_a, report_c = outputs_a[-1][REPORT], outputs_c[-1][REPORT]
        assert not report_a["stopped_early"] and not report_c["stopped_early"]
        assert "recalibration_started" not in [e[-1] for e in engine_figures(report_a, "ISPA")]

        # The same request alone, once the others are done, gives the same engine figures and frames.
        outputs_alone = run(alone, portrait, short, seed=3)
        reference = engine_figures(outputs_alone[-1][REPORT], "ISPA")
        assert engine_figures(report_a, "ISPA") == engine_figures(report_c, "ISPA") == reference
        frames = decoded_frames(outputs_alone, "ispa")
        assert len(frames) == sum(c[1] for c in reference)
        np.testing.assert_array_equal(decoded_frames(outputs_a, "ispa"), frames)
        np.testing.assert_array_equal(decoded_frames(outputs_c, "ispa"), frames)
        assert pipeline_pool().busy() == 0
    finally:
        for user in users:
            user.close()
