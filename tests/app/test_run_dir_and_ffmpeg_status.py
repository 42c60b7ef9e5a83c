"""The per-run temp folder and the plain-words ffmpeg check."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from app import media
from app.media import RUN_DIR_PREFIX, RunDir, ffmpeg_status, remove_stale_run_dirs


def test_run_dir_lives_under_gradio_temp_dir_and_is_removed(_isolated_temp: Path) -> None:
    with RunDir() as run_dir:
        assert run_dir.path.parent == _isolated_temp and run_dir.path.name.startswith(RUN_DIR_PREFIX)
        names = {run_dir.new_path(".mp4") for _ in range(50)}
        assert len(names) == 50 and all(p.parent == run_dir.path and p.suffix == ".mp4" for p in names)
        next(iter(names)).write_bytes(b"x")
    assert not run_dir.path.exists()


def test_run_dir_creates_a_missing_gradio_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "not" / "yet"))
    run_dir = RunDir()
    assert run_dir.path.parent == tmp_path / "not" / "yet"
    run_dir.cleanup()


@pytest.mark.parametrize("suffix", ["mp4", ".MP4", "/../x.mp4", ".mp4/..", ""])
def test_run_dir_refuses_odd_suffixes(suffix: str) -> None:
    with RunDir() as run_dir, pytest.raises(ValueError, match="suffix"):
        run_dir.new_path(suffix)


def test_stale_run_dirs_are_removed_and_fresh_ones_kept(_isolated_temp: Path) -> None:
    old, fresh = RunDir(), RunDir()
    other = _isolated_temp / "not-a-run"
    other.mkdir()
    an_hour_ago = time.time() - 3600
    for path in (old.path, other):
        os.utime(path, (an_hour_ago, an_hour_ago))
    assert remove_stale_run_dirs(max_age_seconds=600) == 1
    assert not old.path.exists() and fresh.path.exists() and other.exists()


def fake_which(present: set[str]):
    return lambda name: f"/usr/bin/{name}" if name in present else None


@pytest.mark.parametrize(
    ("present", "missing_words"),
    [
        ({"ffmpeg"}, "ffprobe is missing"),
        (set(), "ffmpeg and ffprobe are missing"),
        ({"ffprobe"}, "ffmpeg is missing"),
    ],
)
def test_ffmpeg_status_names_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, present: set[str], missing_words: str
) -> None:
    monkeypatch.setattr(media.shutil, "which", fake_which(present))
    status = ffmpeg_status()
    assert not status.can_stream
    assert missing_words in status.message and "install the 'ffmpeg' system package" in status.message
    assert "/usr/bin" not in status.message


def test_ffmpeg_status_when_both_are_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media.shutil, "which", fake_which({"ffmpeg", "ffprobe"}))
    status = ffmpeg_status()
    assert status.can_stream and status.ffmpeg and status.ffprobe
    assert "missing" not in status.message
