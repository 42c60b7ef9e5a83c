"""The page's Stop button in a real browser: the page's hidden owner token (from its load event) reaches the run,
so Stop ends it, while the token appears in no URL the page requested."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.main import SESSIONS
from tests.app.test_ui_browser import GUARD_MS, chromium, speech_clip, upload_portrait, wait_for_status

pytestmark = pytest.mark.browser


def test_stop_ends_the_pages_run_by_its_token(app_url: str, examples_dir: Path, tmp_path: Path) -> None:
    speech = speech_clip(examples_dir, tmp_path, 8.0)  # ~17 chunks: time to press Stop
    with chromium(tmp_path) as context:
        page = context.new_page()
        urls: list[str] = []
        page.on("request", lambda r: urls.append(r.url))
        earlier = set(SESSIONS._owners)  # owners other tests in this process may have left
        page.goto(app_url)
        page.wait_for_selector("#generate", timeout=GUARD_MS)
        upload_portrait(page, examples_dir)
        page.locator("#speech input[type=file]").set_input_files(str(speech))
        page.wait_for_selector("#speech audio", state="attached", timeout=GUARD_MS)
        page.wait_for_function("() => !document.body.innerText.includes('Uploading')", timeout=GUARD_MS)
        page.locator("#generate").click()
        wait_for_status(page, "generating")
        page.locator("#stop").click()
        status = wait_for_status(page, "stopped")
        assert "chunks" in status
        # While the page is open (its close ends its runs): the run is registered under a token issued to a page.
        owners = {key: owner for key, owner in SESSIONS._owners.items() if key not in earlier}
        tokens = [key for key, owner in owners.items() if owner.page is not None and owner.run is not None]
        assert len(tokens) == 1, "the page's run was not registered under its owner token"
        assert owners[tokens[0]].run.stop_requested  # it was Stop, with that token, that ended it
    assert not any(tokens[0] in url for url in urls)
