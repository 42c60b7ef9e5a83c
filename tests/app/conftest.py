"""Shared fixtures for the app tests: temp-dir isolation and the example inputs beside the repo."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

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
