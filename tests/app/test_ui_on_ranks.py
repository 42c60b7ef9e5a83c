"""The app under torchrun (CPU, gloo, the tiny model on 3 processes: 2 DiT ranks and a decoder rank): rank 0
serves Gradio and the other ranks follow its runs. A compare-mode request, whose Full and ISPA runs take turns on
the pipeline, gives the engine figures and the Full video the one-process app gives, and the ISPA video within
float rounding; Recalibrate and Stop reach the run on the ranks; SIGTERM to torchrun ends every rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client

from tests.app.conftest import _free_port
from tests.app.test_ui_client import REPORT, STATUS, recalibrate_then_stop, run, speech_clip
from tests.app.test_ui_many_users import decoded_frames, engine_figures

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROCESSES = 3
START_SECONDS = 240.0
STOP_SECONDS = 60.0
# ISPA's statistics are summed in another order across the DiT ranks, so its frames differ by float rounding
# (at most 2 of 255 before encoding, tests/avatars/test_distributed_pipeline.py); H.264 spreads that over a
# few pixels of the decoded video, so the check is on the mean.
ISPA_MEAN_PIXEL_TOLERANCE = 0.5


@pytest.fixture
def ranked_app(_isolated_temp: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`torchrun --standalone --nproc-per-node 3 app.py` on a free port: its URL and the torchrun process."""
    port = _free_port()
    env = os.environ | {
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_TEMP_DIR": str(_isolated_temp),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "1",
    }
    log = (tmp_path / "torchrun.log").open("w")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={PROCESSES}"]
    process = subprocess.Popen(
        [*command, "app.py"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_served(url, process, tmp_path / "torchrun.log")
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _wait_until_served(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"torchrun exited with {process.returncode} before serving:\n{log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(
        f"the app under torchrun did not serve within {START_SECONDS:.0f} s:\n{log.read_text()[-3000:]}"
    )


def test_compare_mode_on_three_ranks_gives_the_one_process_app_videos(
    ranked_app: tuple[str, subprocess.Popen], app_url: str, examples_dir: Path, tmp_path: Path
) -> None:
    url, torchrun = ranked_app
    portrait, audio = examples_dir / "fashion_blogger.jpg", speech_clip(examples_dir, tmp_path, 2.0)
    client = Client(url, verbose=False, download_files=False)
    ranked = run(client, portrait, audio, policy="Compare", seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every rank under torchrun (OMP_NUM_THREADS=1): the same float rounding
    try:
        alone = run(
            Client(app_url, verbose=False, download_files=False), portrait, audio, policy="Compare", seed=3
        )
    finally:
        torch.set_num_threads(threads)

    report, want = ranked[-1][REPORT], alone[-1][REPORT]
    assert f"on {PROCESSES} processes (2 DiT ranks, the decoder on rank 2)" in report["model"]
    assert f"on {PROCESSES} processes" in ranked[-1][STATUS]
    for name in ("Full", "ISPA"):
        assert engine_figures(report, name) == engine_figures(want, name), name
    assert any(figures[3] for figures in engine_figures(report, "ISPA"))  # ISPA turned layers local
    assert np.array_equal(decoded_frames(ranked, "full"), decoded_frames(alone, "full"))
    ispa, ispa_alone = decoded_frames(ranked, "ispa").astype(int), decoded_frames(alone, "ispa").astype(int)
    assert ispa.shape == ispa_alone.shape
    assert np.abs(ispa - ispa_alone).mean() <= ISPA_MEAN_PIXEL_TOLERANCE

    # Recalibrate and Stop travel from rank 0 down the pipeline with the block they apply to.
    recalibrate_then_stop(client, examples_dir, tmp_path)

    # torchrun's SIGTERM reaches every rank: rank 0 closes the server and tells the others; all exit.
    torchrun.send_signal(signal.SIGTERM)
    torchrun.wait(STOP_SECONDS)
    with pytest.raises(ProcessLookupError):
        os.killpg(torchrun.pid, 0)  # no process of the group is left
