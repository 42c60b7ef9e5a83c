"""The app in a real browser (Debian's headless Chromium driven by Playwright): upload a portrait and speech,
press Generate, and watch the player receive HLS segments (and play them where the browser can decode
H.264/AAC) while the KV plot redraws chunk by chunk; and live mode, with Chromium's fake microphone playing a
speech file. A screenshot is kept as a test artifact, and copied to docs/screenshot.png for the README when
ISPA_SAVE_SCREENSHOT=1."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import soundfile as sf
from playwright.sync_api import BrowserContext, Page, sync_playwright

from app.panels import FULL_RING, FULL_RUN, ISPA_RUN, THIS_RUN
from app.run_view import RECALIBRATE_IDLE, SERIES_COLORS
from avatars.liveavatar.sizing import TINY_SIZES

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]
REPO_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshot.png"
GUARD_MS = 300_000  # generous ceilings against a hang on a busy 2-core machine, not speed limits

CAN_PLAY_H264_AAC = """() => Boolean(window.MediaSource
    && MediaSource.isTypeSupported('video/mp4; codecs="avc1.42E01E, mp4a.40.2"'))"""
# Records, whenever the status line changes, its chunk count, the points of each line the KV plot draws (by
# colour) and whether Recalibrate is on: the plot must already show the chunk the status line announces.
WATCH_STATUS = """() => {
    window.statusLog = [];
    new MutationObserver(() => {
        const text = document.querySelector('#status').innerText;
        const chunks = text.match(/(\\d+) chunks/);
        const lines = {};
        for (const path of document.querySelectorAll('#kv_plot g.mark-line path')) {
            lines[path.getAttribute('stroke')] = (path.getAttribute('d') || '').split(/[ML]/).length - 1;
        }
        window.statusLog.push({chunks: chunks ? Number(chunks[1]) : 0, generating: text.includes('generating'),
            lines, recalibrate: !document.querySelector('#recalibrate').disabled});
    }).observe(document.querySelector('#status'), {subtree: true, childList: true, characterData: true});
}"""
# What a screenshot of the side panel would cut: legend labels outside the plot, text wider than its box.
PANEL_GEOMETRY = """() => {
    const plot = document.querySelector('#kv_plot');
    const svg = plot.querySelector('svg');
    const box = svg.getBoundingClientRect();
    const legend = Array.from(plot.querySelectorAll('.role-legend text'), t => {
        const r = t.getBoundingClientRect();
        return {text: t.textContent, inside: r.left >= box.left - 0.5 && r.right <= box.right + 0.5
            && r.top >= box.top - 0.5 && r.bottom <= box.bottom + 0.5 && r.right <= window.innerWidth};
    });
    const clipped = [];
    for (const id of ['#kv_plot', '#layer_map', '#run_summary', '#status', '#recalibrate_note']) {
        for (const el of [document.querySelector(id), ...document.querySelectorAll(id + ' *')]) {
            const style = getComputedStyle(el);
            const hides = ['hidden', 'clip', 'auto', 'scroll'].includes(style.overflowX);  // cut, or to scroll
            if (hides && el.scrollWidth > el.clientWidth + 1) clipped.push(id + ' ' + el.tagName + ': '
                + el.textContent.slice(0, 40));
            if (style.textOverflow === 'ellipsis' && el.scrollWidth > el.clientWidth + 1) clipped.push(id);
        }
    }
    const lines = {};
    for (const path of plot.querySelectorAll('g.mark-line path')) {
        const ys = (path.getAttribute('d') || '').split(/[ML]/).filter(Boolean)
            .map(point => Number(point.split(',')[1]));
        lines[path.getAttribute('stroke')] = ys;
    }
    const grid = plot.querySelector('.role-axis-grid');
    return {legend, clipped, lines, plotHeight: grid ? grid.getBBox().height : 0,
        caption: plot.querySelector('.caption')?.textContent || ''};
}"""
SCREEN = (1280, 800)
PLAYHEAD = "() => { const v = document.querySelector('#player_a video'); return v ? v.currentTime : -1; }"


@contextmanager
def chromium(
    tmp_path: Path, extra_args: tuple[str, ...] = (), viewport: tuple[int, int] = (1600, 1100)
) -> Iterator[BrowserContext]:
    """Headless Debian Chromium with a fresh profile; no browser download, no background traffic."""
    assert CHROMIUM.exists(), "the browser test needs Debian's chromium (scripts/setup.sh --dev installs it)"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=[*CHROMIUM_ARGS, *extra_args],
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            yield context
        finally:
            context.close()


def speech_clip(
    examples_dir: Path, tmp_path: Path, seconds: float, source: str = "fashion_blogger.wav"
) -> Path:
    """The first `seconds` of an example recording (which must be that long) as a 16-bit WAV."""
    audio, rate = sf.read(examples_dir / source, dtype="float32")
    if len(audio) < round(seconds * rate):
        raise ValueError(f"{source} lasts {len(audio) / rate:.1f} s, shorter than the {seconds} s asked for")
    path = tmp_path / "speech.wav"
    sf.write(path, audio[: round(seconds * rate)], rate, subtype="PCM_16")
    return path


def upload_portrait(page: Page, examples_dir: Path) -> None:
    page.locator("#portrait input[type=file]").set_input_files(str(examples_dir / "fashion_blogger.jpg"))
    page.wait_for_selector("#portrait img", timeout=GUARD_MS)


SMALL_SIZE = min(TINY_SIZES, key=lambda size: size.max_area).label


def choose_small_size(page: Page) -> None:
    """The tiny model's smaller size, in the settings (closed again after): the panels and the player do not
    depend on it, and it halves the VAE's work, most of a tiny run."""
    settings = page.locator("#settings").get_by_text("Prompt and engine settings")
    settings.click()
    size = page.get_by_label("Size")
    size.fill(SMALL_SIZE)
    size.press("Enter")
    assert size.input_value() == SMALL_SIZE
    settings.click()
    page.evaluate("() => window.scrollTo(0, 0)")  # the screen checks are of the first screen


def wait_for_status(page: Page, word: str) -> str:
    page.wait_for_function(
        f"() => document.querySelector('#status').innerText.includes('{word}')", timeout=GUARD_MS
    )
    return page.locator("#status").inner_text()


def test_a_run_streams_into_the_player_and_redraws_the_plot(
    app_url: str, examples_dir: Path, tmp_path: Path
) -> None:
    """ISPA, then Full, then Compare on one page at 1280×800: the video streams, the plot keeps up with the
    status line, and each policy's screenshot shows its data with nothing cut (issue 23, items 7-9)."""
    saving = os.environ.get("ISPA_SAVE_SCREENSHOT") == "1"
    # ~14 chunks when the screenshot is kept: a window to catch the run mid-stream; else ~7, absorb included.
    speech = speech_clip(examples_dir, tmp_path, 6.0 if saving else 3.0)
    mid_stream = tmp_path / "mid-stream.png"
    with chromium(tmp_path, viewport=SCREEN) as context:
        page = context.new_page()
        streamed: list[tuple[str, int]] = []
        page.on(
            "response",
            lambda r: streamed.append((r.url, r.status)) if "/gradio_api/stream/" in r.url else None,
        )
        page.goto(app_url)
        page.wait_for_selector("#generate", timeout=GUARD_MS)
        assert "untrained test model" in page.locator("#banner").inner_text()
        assert page.locator("#recalibrate").is_disabled()  # no run streams yet, and the line says so
        assert page.locator("#recalibrate_note").inner_text() == RECALIBRATE_IDLE

        upload_portrait(page, examples_dir)
        choose_small_size(page)
        page.locator("#speech input[type=file]").set_input_files(str(speech))
        page.wait_for_selector("#speech audio", state="attached", timeout=GUARD_MS)
        page.wait_for_function("() => !document.body.innerText.includes('Uploading')", timeout=GUARD_MS)
        can_play = page.evaluate(CAN_PLAY_H264_AAC)
        page.evaluate(WATCH_STATUS)

        page.locator("#generate").click()
        # Mid-stream: the absorb is on the plot with two chunks after it (its drop shows as a step, not at the
        # plot's right edge), the player is playing, and the run is still generating.
        mid_stream_or_done = f"""() => {{ const status = document.querySelector('#status').innerText;
            const chunks = Number((status.match(/(\\d+) chunks/) || [0, 0])[1]);
            return status.includes('finished') || (chunks >= 7
                && (document.querySelector('#kv_plot .caption')?.textContent || '').includes('absorbed at')
                && (!{str(can_play).lower()} || ({PLAYHEAD})() > 0.3)); }}"""
        page.wait_for_function(mid_stream_or_done, timeout=GUARD_MS)
        caught_mid_stream = "generating" in page.locator("#status").inner_text()
        if caught_mid_stream:
            page.screenshot(path=str(mid_stream))
        status = wait_for_status(page, "finished")
        assert "untrained test model" in status and "ISPA" in status

        # HLS: the player fetched the run's playlist; where this Chromium decodes H.264/AAC (hls.js needs it),
        # it also fetched the segments and played them. Elsewhere the segments are checked on the server,
        # through the playlist the page received.
        assert all(code == 200 for _, code in streamed)
        playlists = {url for url, _ in streamed if url.endswith("playlist.m3u8")}
        assert len(playlists) == 1
        if can_play:
            while len({url for url, _ in streamed if url.endswith(".ts")}) < 2:
                page.wait_for_timeout(250)  # hls.js fetches the last segments after the run has ended
            page.wait_for_function(f"() => ({PLAYHEAD})() > 1.0", timeout=GUARD_MS)
        else:
            playlist = page.request.get(playlists.pop()).text()
            assert playlist.count(".ts") >= 2 and "#EXT-X-ENDLIST" in playlist

        # The plot was redrawn chunk after chunk and never behind the status line: when the status announced
        # chunk n, the step lines already had their 2n - 1 points (issue 23: they lagged one chunk).
        # A step whose plot properties change redraws the plot from scratch, with its new data, while the status
        # line changes: caught in that redraw, the plot has no line yet and tells nothing.
        log = page.evaluate("() => window.statusLog")
        counted = [entry for entry in log if entry["chunks"] >= 2 and entry["lines"]]
        assert len({entry["chunks"] for entry in counted}) >= 3, log
        for entry in counted:
            assert max(entry["lines"].values()) >= 2 * entry["chunks"] - 1, entry  # any colour: the first
            # chunk's data come before the plot's colours (its first redraw)
        # Recalibrate was on while the ISPA run streamed, and is off again now that it has ended.
        assert any(entry["recalibrate"] for entry in log if entry["generating"]), log
        page.wait_for_function("() => document.querySelector('#recalibrate').disabled", timeout=GUARD_MS)
        assert "layers local (L)" in page.locator("#layer_map").inner_text()
        ispa = check_side_panel(page, tmp_path / "ispa.png")
        assert "absorbed at" in ispa["caption"]
        # The absorb's drop is a step the eye sees: a fifth of the plot's height or more (issue 23, item 8).
        run_line = ispa["lines"][SERIES_COLORS[THIS_RUN]]
        drop = max(after - before for before, after in zip(run_line, run_line[1:], strict=False))
        assert drop >= 0.2 * ispa["plotHeight"], (drop, ispa["plotHeight"])

        full = run_policy(page, "Full", tmp_path / "full.png")
        assert (
            full["caption"].startswith("Full: every layer keeps attending")
            and "warmup)" not in full["caption"]
        )
        assert FULL_RING not in full["legend"]  # it is this run itself, drawn under it: the caption says so
        summary = page.locator("#run_summary").inner_text()
        assert "never absorbs" in summary and "warmup" not in summary and "Absorb step" not in summary
        assert page.locator("#recalibrate").is_disabled()

        compare = run_policy(page, "Compare", tmp_path / "compare.png")
        assert compare["legend"] == [FULL_RUN, ISPA_RUN] and "absorbed at" in compare["caption"]

    if saving:
        assert caught_mid_stream, (
            "the run finished before three chunks were on screen: no mid-stream screenshot"
        )
        REPO_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(mid_stream, REPO_SCREENSHOT)


def run_policy(page: Page, policy: str, screenshot: Path) -> dict:
    """Run `policy` on the inputs already given and check its side panel once it has finished."""
    page.get_by_role("radio", name=policy, exact=True).check()
    before = page.locator("#status").inner_text()
    page.locator("#generate").click()
    page.wait_for_function(
        f"""() => {{ const s = document.querySelector('#status').innerText;
            return s !== {before!r} && s.includes('finished') && s.includes('{policy}'); }}""",
        timeout=GUARD_MS,
    )
    page.wait_for_function("() => document.querySelector('#recalibrate').disabled", timeout=GUARD_MS)
    return check_side_panel(page, screenshot)


def check_side_panel(page: Page, screenshot: Path) -> dict:
    """The screen at 1280×800 once the plot has settled: its lines are drawn, every legend label lies whole
    inside the plot, and no panel text is cut; returns the measurements with the legend's labels."""
    page.wait_for_timeout(500)  # the plot's redraw after the last update is asynchronous
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000
    geometry = page.evaluate(PANEL_GEOMETRY)
    assert geometry["lines"] and max(len(ys) for ys in geometry["lines"].values()) >= 3, geometry
    assert all(label["inside"] and "…" not in label["text"] for label in geometry["legend"]), geometry[
        "legend"
    ]
    assert not geometry["clipped"], geometry["clipped"]
    box = page.locator("#kv_plot").bounding_box()
    assert box is not None and box["x"] + box["width"] <= SCREEN[0] and box["y"] + box["height"] <= SCREEN[1]
    geometry["legend"] = [label["text"] for label in geometry["legend"]]
    return geometry


def test_generate_and_the_policy_are_on_the_first_screen(app_url: str, tmp_path: Path) -> None:
    """At 1280×800 the eye finds the inputs, the policy and Generate without scrolling; the panels say what
    will appear in them before any run."""
    with chromium(tmp_path, viewport=(1280, 800)) as context:
        page = context.new_page()
        page.goto(app_url)
        page.wait_for_selector("#generate", timeout=GUARD_MS)
        for element in ("#portrait", "#speech", "#policy", "#generate", "#stop", "#recalibrate_note"):
            box = page.locator(element).bounding_box()
            assert box is not None and box["y"] + box["height"] <= 800, (element, box)
        assert "one cell per self-attention layer" in page.locator("#layer_map").inner_text()
        assert "press Generate" in page.locator("#status").inner_text()


def test_live_microphone_drives_a_run_while_recording(
    app_url: str, examples_dir: Path, tmp_path: Path
) -> None:
    """Chromium's fake microphone plays a speech file (in a loop); video must come out before the recording is
    stopped, and the run ends once it is."""
    microphone = speech_clip(examples_dir, tmp_path, 4.0)
    fake_mic = (
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}",
    )
    with chromium(tmp_path, fake_mic) as context:
        page = context.new_page()
        page.goto(app_url)
        page.wait_for_selector("#generate", timeout=GUARD_MS)
        upload_portrait(page, examples_dir)
        page.get_by_text("Live mode (microphone)").click()
        live_mic = page.locator("#live_mic")
        live_mic.get_by_role("button", name="Record").click()
        status = wait_for_status(page, "generating")  # a chunk is out while the microphone is still on
        assert "chunks" in status
        live_mic.get_by_role("button", name="Stop").click()
        status = wait_for_status(page, "finished")
    assert "Speech → video delay" in status
