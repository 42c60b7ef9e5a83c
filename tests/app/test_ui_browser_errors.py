"""Bad input in a real browser (Debian's headless Chromium via Playwright): the page shows the app's message,
not a bare "Error"."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
from playwright.sync_api import sync_playwright

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
GUARD_MS = 300_000  # a ceiling against a hang on a busy machine, not a speed limit


def test_a_text_file_as_the_portrait_ends_with_a_visible_message(
    app_url: str, examples_dir: Path, tmp_path: Path
) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is a text file, not a picture\n")
    audio, rate = sf.read(examples_dir / "fashion_blogger.wav", dtype="float32")
    speech = tmp_path / "speech.wav"
    sf.write(speech, audio[:rate], rate, subtype="PCM_16")
    assert CHROMIUM.exists(), "the browser test needs Debian's chromium (scripts/setup.sh --dev installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(app_url)
            page.wait_for_selector("#generate", timeout=GUARD_MS)
            page.locator("#portrait input[type=file]").set_input_files(str(not_an_image))
            page.locator("#speech input[type=file]").set_input_files(str(speech))
            page.wait_for_selector("#speech audio", state="attached", timeout=GUARD_MS)
            page.wait_for_function("() => !document.body.innerText.includes('Uploading')", timeout=GUARD_MS)
            page.locator("#generate").click()
            page.wait_for_function(
                "() => document.body.innerText.includes('The portrait is not a readable image')",
                timeout=GUARD_MS,
            )
            page.screenshot(path=str(tmp_path / "portrait-error.png"))
        finally:
            browser.close()
