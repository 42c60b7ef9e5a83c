"""Shared fixtures for the app tests: temp-dir isolation, the example inputs beside the repo, the served app."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from avatars.liveavatar.distributed import PipelineLead, PipelineWorld
from avatars.liveavatar.distributed.channel import PeerChannel
from avatars.liveavatar.loading import build_tiny_pipeline
from avatars.liveavatar.rank_layout import RankLayout

EXAMPLES_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "examples"


@pytest.fixture(autouse=True)
def _isolated_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point Gradio's and Python's temp dirs at tmp_path, so nothing a test writes lands elsewhere."""
    root = tmp_path / "temp-root"
    root.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(root))
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture
def examples_dir() -> Path:
    assert EXAMPLES_DIR.is_dir(), f"example inputs missing at {EXAMPLES_DIR}"
    return EXAMPLES_DIR


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(_isolated_temp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The whole app served on a free local port (temp files in this test's tmp_path, no analytics)."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from app.main import build_demo, serve

    demo = build_demo()
    _, url, _ = serve(
        demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True
    )
    try:
        yield url
    finally:
        demo.close()


def unjoined_lead(processes: int) -> PipelineLead:
    """Rank 0's lead of the tiny model on a layout of `processes`, without a process group (for what the app
    reads of it and plans for it; nothing here may send a message)."""
    world = PipelineWorld(0, RankLayout.for_world(processes), PeerChannel(0), None, timedelta(seconds=5))
    return PipelineLead(build_tiny_pipeline(seed=0), world, keep_alive=False)
