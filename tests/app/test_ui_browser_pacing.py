"""Playback without stalls, in Chromium: a backend that makes video at half real time (tests/fixtures/
paced_backend.py) streams a 16 s clip; the page counts the video element's `waiting` and `stalled` events and the
time spent waiting from the start of playback to its end (Gradio's end of stream included, see app/stream_end.py).
None may happen, and playback must start within 20 % of the least delay that avoids a stall, computed afterwards
from when the server made each segment (the delay judged at the moment the app hands the first segment to
Gradio, since Gradio's encoding and the player's fetch add the same to both). At 1× and 2× real time the pacing
adds no delay by its arithmetic, tested exactly in tests/app/test_pacing.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import generation, models
from app.playback import Playback
from app.run_recorder import MIN_SEGMENT_SECONDS
from tests.app.test_ui_browser import GUARD_MS, chromium, speech_clip, upload_portrait, wait_for_status
from tests.fixtures.paced_backend import PacedBackend

pytestmark = pytest.mark.browser

CLIP_S = 16.0
RATE = 0.5
# Records each media event of the player with the wall clock (Date.now, the server's time.time) and the
# status lines shown.
WATCH_PLAYER = """() => {
    window.mediaEvents = [];
    for (const type of ['playing', 'waiting', 'stalled', 'ended']) {
        document.addEventListener(type, (e) => {
            if (e.target.closest && e.target.closest('#player_a'))
                window.mediaEvents.push([type, Date.now() / 1000, e.target.currentTime]);
        }, true);
    }
    window.statusLines = [];
    new MutationObserver(() => window.statusLines.push(document.querySelector('#status').innerText))
        .observe(document.querySelector('#status'), {subtree: true, childList: true, characterData: true});
}"""


class WatchedPlayback(Playback):
    """The app's playback, noting (wall clock) when it first hands video to the player."""

    released: list[float] = []

    def due(self, *args, **kwargs) -> list[dict[str, Path]]:
        out = super().due(*args, **kwargs)
        if out:
            self.released.append(time.time())
        return out


@pytest.fixture
def paced(monkeypatch: pytest.MonkeyPatch) -> Iterator[PacedBackend]:
    """Every run goes to a backend at half real time (the module's pool and served model restored after)."""
    monkeypatch.setattr(models, "_pool", None)
    monkeypatch.setattr(models, "_only", None)
    monkeypatch.setattr(generation, "Playback", WatchedPlayback)
    WatchedPlayback.released = []
    backend = PacedBackend(RATE, clock=time.time)
    models.serve_only(models.TEST_MODEL, backend, "this test serves one backend")
    yield backend


def segment_bounds(playlist: str) -> list[tuple[float, float]]:
    """(media start, media end) of each segment, from the playlist's EXTINF lines."""
    bounds, start = [], 0.0
    for line in playlist.splitlines():
        if line.startswith("#EXTINF:"):
            length = float(line.removeprefix("#EXTINF:").rstrip(","))
            bounds.append((start, start + length))
            start += length
    return bounds


def play_in_chromium(
    app_url: str, examples_dir: Path, tmp_path: Path, speech: Path
) -> tuple[float, list, list[str], str]:
    """Generate from `speech` in a fresh page and wait for the player's `ended`: the click's time (wall clock), the
    player's events, the status lines shown, and the final playlist."""
    with chromium(tmp_path) as context:
        page = context.new_page()
        playlists: list[str] = []
        page.on("response", lambda r: playlists.append(r.url) if r.url.endswith("playlist.m3u8") else None)
        page.goto(app_url)
        page.wait_for_selector("#generate", timeout=GUARD_MS)
        upload_portrait(page, examples_dir)
        page.locator("#speech input[type=file]").set_input_files(str(speech))
        page.wait_for_function("() => !document.body.innerText.includes('Uploading')", timeout=GUARD_MS)
        page.evaluate(WATCH_PLAYER)
        clicked = page.evaluate("() => Date.now() / 1000")
        page.locator("#generate").click()
        wait_for_status(page, "finished")
        page.wait_for_function("() => window.mediaEvents.some(e => e[0] === 'ended')", timeout=GUARD_MS)
        events = page.evaluate("() => window.mediaEvents")
        statuses = page.evaluate("() => window.statusLines")
        playlist = page.request.get(playlists[-1]).text()
    return clicked, events, statuses, playlist


def test_playback_below_real_time_starts_late_enough_never_to_stall(
    paced: PacedBackend, app_url: str, examples_dir: Path, tmp_path: Path
) -> None:
    speech = speech_clip(examples_dir, tmp_path, CLIP_S, source="dwarven_blacksmith.wav")
    clicked, events, statuses, playlist = play_in_chromium(app_url, examples_dir, tmp_path, speech)

    bounds = segment_bounds(playlist)
    started = next(t for kind, t, _ in events if kind == "playing")
    ended = next(t for kind, t, _ in events if kind == "ended")
    after = [(kind, t, media) for kind, t, media in events if started < t < ended]
    waits = [t for kind, t, _ in after if kind == "waiting"]
    stall_s = sum(
        next((t2 for kind2, t2, _ in after if kind2 == "playing" and t2 > t), ended) - t for t in waits
    )
    stalled = [t for kind, t, _ in after if kind == "stalled"]

    made = paced.chunk_times  # (wall clock, video seconds made) per chunk
    last_made = made[-1][1]
    # A segment is ready with its last chunk (the playlist's last entry is Gradio's own audio tail, ready with
    # the last chunk at the earliest).
    ready = [next(t for t, video_s in made if video_s >= min(end, last_made) - 1e-6) for _, end in bounds]
    least = max(t - start for t, (start, _) in zip(ready, bounds, strict=True))
    released = WatchedPlayback.released[0]
    report = (
        f"video handed over {released - clicked:.2f} s after the click, the least stall-free start "
        f"{least - clicked:.2f} s; the player started at {started - clicked:.2f} s; waiting {len(waits)}, "
        f"stalled {len(stalled)}, stall time {stall_s:.2f} s (the end of stream included); player events (kind, s after the click, media s): "
        f"{[(kind, round(t - clicked, 2), round(media, 2)) for kind, t, media in events]}; segments made (s after "
        f"the click, media start): {[(round(t - clicked, 2), start) for t, (start, _) in zip(ready, bounds, strict=True)]}"
    )
    print(report)
    assert next(media for kind, _, media in events if kind == "ended") >= CLIP_S - 0.5, report  # played whole
    assert len(bounds) >= 12, playlist
    assert any("so playback will not stop" in line for line in statuses), statuses
    assert waits == [] and stalled == [] and stall_s == 0, report
    # The delay is judged where the app decides it, the hand-over: Gradio's encoding and the player's fetch
    # add the same to the least start as to the actual one.
    assert least - 0.05 <= released <= clicked + 1.2 * (least - clicked), report


@pytest.mark.parametrize("rate", [1.0, 2.0])
def test_at_or_above_real_time_the_first_segment_goes_out_at_once(
    paced: PacedBackend, app_url: str, examples_dir: Path, tmp_path: Path, rate: float
) -> None:
    """No delay added: the first segment goes to the player in the step that made it, and the clip plays to its
    end. Above real time nothing can stall either; at exactly real time nothing is held back by design, so a late
    hand-over may still make the player wait (not asserted)."""
    paced.rate = rate
    clip_s = 4.0
    speech = speech_clip(examples_dir, tmp_path, clip_s)
    clicked, events, statuses, _ = play_in_chromium(app_url, examples_dir, tmp_path, speech)

    first_ready = next(t for t, video_s in paced.chunk_times if video_s >= MIN_SEGMENT_SECONDS - 1e-9)
    handed = WatchedPlayback.released[0]
    report = f"first segment made {first_ready - clicked:.2f} s after the click, handed over {handed - clicked:.2f} s"
    report += (
        f"; player events: {[(kind, round(t - clicked, 2), round(media, 2)) for kind, t, media in events]}"
    )
    print(report)
    assert 0 <= handed - first_ready <= 0.25, report
    assert not any("so playback will not stop" in line for line in statuses), statuses
    assert next(media for kind, _, media in events if kind == "ended") >= clip_s - 0.5, report
    if rate > 1:
        started = next(t for kind, t, _ in events if kind == "playing")
        assert not [kind for kind, t, _ in events if t > started and kind in ("waiting", "stalled")], report
