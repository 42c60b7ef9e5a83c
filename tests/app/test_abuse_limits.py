"""Limits for a public Space: upload budgets per request, per client and in all, Gradio's /cancel refused for the
generation events, heartbeats counted so that a dropped heartbeat for someone else's session hash ends nothing,
runs controlled only by their owner token, a session's messages and streams its client's alone, and the page's
hidden events the page's (the guard's own cases: tests/app/test_session_binding.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import gradio as gr
import httpx
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from app import main
from app.media import RunDir
from app.request_guard import (
    CANCEL_INDEX_REFUSAL,
    CANCEL_REFUSAL,
    OpenHeartbeats,
    RequestGuard,
    client_address,
)
from app.upload_budget import MB, ClientBudget, UploadLimits, disk_refusal, folder_bytes, request_refusal
from tests.app.test_ui_client import is_step

SMALL = "64×64 area"
LAYERS = 3  # the layer map's position in a run's outputs


# ------------------------------------------------------------------------------------------- the budgets
def test_files_of_one_request_are_counted_together() -> None:
    limits = UploadLimits()
    framing = 2000
    assert request_refusal(49 * MB + framing, limits) is None
    two_files = request_refusal(2 * 30 * MB + framing, limits)
    assert two_files is not None and "more than the 50 MB one request may upload in all" in two_files
    assert "Content-Length" in request_refusal(None, limits)


def test_a_client_budget_refuses_twenty_large_uploads_and_refills_after_its_window() -> None:
    now = [0.0]
    budget = ClientBudget(200 * MB, 600.0, clock=lambda: now[0])
    accepted = 0
    for i in range(20):
        now[0] = float(i)
        if budget.spend("203.0.113.7", 49 * MB) is None:
            accepted += 1
    assert accepted == 4  # 196 MB of the 200 MB budget
    refusal = budget.spend("203.0.113.7", 49 * MB)
    assert refusal is not None and "You have uploaded 196 MB in the last 10 minutes" in refusal
    assert "try again in 10 minute(s)" in refusal
    assert budget.spend("198.51.100.2", 49 * MB) is None  # another client has its own budget
    now[0] = 600.5  # the first upload has left the window, the others not yet
    assert budget.spend("203.0.113.7", 49 * MB) is None
    assert budget.spend("203.0.113.7", 49 * MB) is not None


def test_the_temp_budget_counts_every_file_under_the_folder(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "upload.bin").write_bytes(b"x" * 3000)
    (tmp_path / "run.mp4").write_bytes(b"y" * 1000)
    (tmp_path / "link").symlink_to(tmp_path / "run.mp4")  # not counted twice
    assert folder_bytes(tmp_path) == 4000
    limits = UploadLimits(temp_budget_bytes=5000, min_free_bytes=0)
    assert disk_refusal(tmp_path, 1000, limits) is None
    refusal = disk_refusal(tmp_path, 1001, limits)
    assert refusal is not None and "temporary storage is full" in refusal
    huge_floor = UploadLimits(min_free_bytes=2**62)
    assert disk_refusal(tmp_path, 0, huge_floor) is not None  # the disk's own free space counts too


# --------------------------------------------------------------------------------------- the middleware
def guarded(limits: UploadLimits, root: Path, protected: set[int], heartbeats: OpenHeartbeats) -> TestClient:
    """A small app behind the guard that echoes what reached it."""

    async def echo(request):
        return PlainTextResponse(f"reached {len(await request.body())}")

    routes = [Route(f"/gradio_api/{name}", echo, methods=["GET", "POST"]) for name in ("upload", "cancel")]
    guard = Middleware(
        RequestGuard,
        limits=limits,
        budget=ClientBudget(limits.client_bytes, limits.client_window_seconds),
        temp_root=lambda: root,
        protected_fns=lambda: protected,
        heartbeats=heartbeats,
    )
    return TestClient(Starlette(routes=routes, middleware=[guard]))


def test_the_guard_answers_in_its_words_before_the_app_reads_anything(tmp_path: Path) -> None:
    limits = UploadLimits(request_bytes=1000, client_bytes=2500, temp_budget_bytes=10**9, min_free_bytes=0)
    client = guarded(limits, tmp_path, {1}, OpenHeartbeats())
    files = [("files", ("a.bin", b"a" * 600)), ("files", ("b.bin", b"b" * 600))]
    two = client.post("/gradio_api/upload", files=files)
    assert two.status_code == 413 and "one request may upload in all" in two.text
    for _ in range(3):  # 3 × ~900 bytes pass 2500 bytes only twice
        last = client.post("/gradio_api/upload", content=b"z" * 900)
    assert last.status_code == 429 and "a client may upload" in last.text
    event = client.post("/gradio_api/cancel", json={"fn_index": 7, "session_hash": "s", "event_id": "e"})
    assert event.text.startswith("reached")  # an event's small JSON body is not an upload: not counted
    chunked = client.post("/gradio_api/upload", content=iter([b"z" * 10]))
    assert chunked.status_code == 411

    full = guarded(UploadLimits(temp_budget_bytes=100, min_free_bytes=0), tmp_path, {1}, OpenHeartbeats())
    (tmp_path / "old-upload.bin").write_bytes(b"o" * 90)
    refused = full.post("/gradio_api/upload", content=b"n" * 20)
    assert refused.status_code == 507 and "temporary storage is full" in refused.text
    assert full.post("/gradio_api/upload", content=b"n" * 10).text == "reached 10"


def test_gradio_cancel_is_refused_for_the_generation_events_only(tmp_path: Path) -> None:
    client = guarded(UploadLimits(), tmp_path, {1, 3}, OpenHeartbeats())
    body = {"session_hash": "someone-elses", "event_id": "e"}
    refused = client.post("/gradio_api/cancel", json=body | {"fn_index": 3})
    assert refused.status_code == 403 and refused.text == CANCEL_REFUSAL
    for coerced in ("3", 3.0, True, "x", [3]):  # forms Gradio would coerce to an index (or fail on)
        refused = client.post("/gradio_api/cancel", json=body | {"fn_index": coerced})
        assert refused.status_code == 400 and refused.text == CANCEL_INDEX_REFUSAL, coerced
    other = json.dumps(body | {"fn_index": 7}).encode()
    passed = client.post("/gradio_api/cancel", content=other, headers={"content-type": "application/json"})
    assert passed.text == f"reached {len(other)}"  # any other event's cancel reaches the app, body whole


def test_a_heartbeat_counts_until_its_client_is_gone() -> None:
    heartbeats = OpenHeartbeats()
    seen: list[int] = []

    async def app(scope, receive, send):  # a heartbeat route: waits for the client to go
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen.append(heartbeats.count("victim"))
        await receive()  # the disconnect
        seen.append(heartbeats.count("victim"))  # what an unload handler running now would see

    guard = RequestGuard(
        app,
        limits=UploadLimits(),
        budget=ClientBudget(1, 1.0),
        temp_root=Path,
        protected_fns=set,
        heartbeats=heartbeats,
    )

    async def connect() -> None:
        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):
            pass

        scope = {"type": "http", "method": "GET", "path": "/gradio_api/heartbeat/victim", "headers": []}
        heartbeats.opened("victim")  # the victim's own page is connected
        await guard(scope, receive, send)

    asyncio.run(connect())
    assert seen == [2, 1] and heartbeats.count("victim") == 1


def test_behind_a_space_proxy_the_client_is_the_address_the_proxy_appended() -> None:
    scope = {"client": ("10.0.0.1", 5000), "headers": [(b"x-forwarded-for", b"1.2.3.4, 203.0.113.9")]}
    assert client_address(scope, trust_forwarded=True) == "203.0.113.9"
    assert client_address(scope, trust_forwarded=False) == "10.0.0.1"


def test_a_dropped_heartbeat_for_a_page_still_connected_ends_nothing(tmp_path: Path) -> None:
    request = gr.Request(session_hash="still-open-page")
    token = main.issue_owner_token(request)
    main.HEARTBEATS.opened("still-open-page")
    run_dir = RunDir()
    main.SESSIONS.begin_run(token, run_dir, [])
    try:
        main.end_session(request)  # someone dropped a heartbeat of this hash: the page's own is still open
        assert main.SESSIONS.run(token) is not None and run_dir.path.exists()
    finally:
        main.HEARTBEATS.closed("still-open-page")
    main.end_session(request)  # the page's own heartbeat ended: its run goes
    assert main.SESSIONS.run(token) is None and not run_dir.path.exists()


def test_generate_is_refused_in_our_words_when_the_temp_budget_is_spent(
    _isolated_temp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (_isolated_temp / "earlier-upload.bin").write_bytes(b"u" * 1000)
    monkeypatch.setattr(main, "UPLOAD_LIMITS", UploadLimits(temp_budget_bytes=1000, min_free_bytes=0))
    monkeypatch.setattr(main, "RUN_DISK_RESERVE_BYTES", 1)
    request = gr.Request(session_hash="full-disk")
    run = main.generate(None, None, "hello", "", "ISPA", 0.5, 6, 1, "tiny", request=request)
    with pytest.raises(gr.Error, match="temporary storage is full"):
        next(run)
    monkeypatch.setattr(
        main, "RUN_DISK_RESERVE_BYTES", 0
    )  # exactly at the budget: the inputs are checked next
    with pytest.raises(gr.Error, match="Please provide a portrait image"):
        next(main.generate(None, None, "hello", "", "ISPA", 0.5, 6, 1, "tiny", request=request))


# ------------------------------------------------------------------------------------ the served app
@pytest.fixture
def small_limits_url(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    limits = UploadLimits(
        request_bytes=300_000, client_bytes=1_100_000, temp_budget_bytes=10**10, min_free_bytes=0
    )
    monkeypatch.setattr(main, "UPLOAD_LIMITS", limits)
    return request.getfixturevalue("app_url")


def test_the_served_app_applies_the_budgets(small_limits_url: str) -> None:
    upload = small_limits_url.rstrip("/") + "/gradio_api/upload"
    files = [("files", ("a.wav", b"a" * 200_000)), ("files", ("b.wav", b"b" * 200_000))]
    two = httpx.post(upload, files=files, timeout=60)
    assert two.status_code == 413 and "one request may upload in all" in two.text
    statuses = [
        httpx.post(upload, files={"files": ("c.bin", b"c" * 250_000)}, timeout=60).status_code
        for _ in range(5)
    ]
    assert statuses == [200, 200, 200, 200, 429]
    generate = fn_index(small_limits_url, "generate")
    for form in (generate, float(generate), str(generate)):  # an int, a float and a string all name event 1
        cancel = httpx.post(
            small_limits_url.rstrip("/") + "/gradio_api/cancel",
            json={"session_hash": "anyone", "fn_index": form, "event_id": "x"},
            timeout=60,
        )
        assert 400 <= cancel.status_code < 500 and "/cancel" in cancel.text, form


def fn_index(url: str, api_name: str) -> int:
    config = httpx.get(url.rstrip("/") + "/config", timeout=60).json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


def join_as(url: str, session_hash: str, api_name: str, data: list) -> httpx.Response:
    """Queue an event under a session hash of the caller's choosing, the way the page does (POST /queue/join),
    without reading its results."""
    body = {
        "data": data,
        "fn_index": fn_index(url, api_name),
        "session_hash": session_hash,
        "event_data": None,
        "trigger_id": None,
    }
    return httpx.post(url.rstrip("/") + "/gradio_api/queue/join", json=body, timeout=60)


def page_calls(client: httpx.Client, url: str, session_hash: str, name: str, data: list) -> httpx.Response:
    """A non-queued hidden event called by fn_index (found in the page's config), as the page calls it."""
    body = {"data": data, "fn_index": fn_index(url, name), "session_hash": session_hash}
    return client.post(url.rstrip("/") + "/gradio_api/run/predict", json=body, timeout=60)


def test_the_page_flow_works_and_a_client_that_never_loaded_the_page_gets_none_of_its_events(
    app_url: str,
) -> None:
    """Issue 23, item 4, replayed through the served app: the hidden events called by fn_index from a client that
    never loaded the page are refused, and a made-up token opens no feed; the page (its cookie comes with
    `GET /`) gets its token and opens and closes its microphone feed with it."""
    owners = main.SESSIONS.owners()
    stranger = httpx.Client()
    made_up = "a-token-the-stranger-chose-0123"
    for name, data in (("issue_owner_token", []), ("open_live_feed", [made_up]), ("end_session", [])):
        refused = page_calls(stranger, app_url, "strangers-own-hash", name, data)
        assert refused.status_code == 403 and "belongs to the app's page" in refused.text, name
    with httpx.Client() as page:
        page.get(app_url)
        token = page_calls(page, app_url, "the-pages-hash", "issue_owner_token", []).json()["data"][0]
        assert page_calls(page, app_url, "the-pages-hash", "open_live_feed", [token]).status_code == 200
        feed = main.SESSIONS.feed(token)
        assert feed is not None and not feed.closed
        made_up_feed = page_calls(page, app_url, "the-pages-hash", "open_live_feed", [made_up])
        assert made_up_feed.status_code == 200 and main.SESSIONS.feed(made_up) is None
        assert main.SESSIONS.owners() == owners + 1  # the page's token only
        closing = page_calls(stranger, app_url, "the-pages-hash", "close_live_feed", [token])
        assert closing.status_code == 403 and not feed.closed
        assert page_calls(page, app_url, "the-pages-hash", "close_live_feed", [token]).status_code == 200
        assert feed.closed
    main.SESSIONS.end_page("the-pages-hash")
    stranger.close()


def stream_url(outputs: tuple) -> str | None:
    video = outputs[0]
    return video["url"] if isinstance(video, dict) and video.get("is_stream") else None


def test_only_the_owner_token_stops_a_run_and_its_session_is_its_clients_alone(
    app_url: str, examples_dir: Path, tmp_path: Path
) -> None:
    """The stranger of issue 23 (items 1 to 3), replayed: with the API client's session hash (it is in the stream
    URLs) it tries Stop, Recalibrate and /cancel, reads the session's event stream and heartbeat, and fetches the
    streamed video; all refused, while the API client, with its token and its cookies, streams and stops its run."""
    audio, rate = sf.read(examples_dir / "fashion_blogger.wav", dtype="float32")
    speech = tmp_path / "speech.wav"
    sf.write(speech, audio[: 4 * rate], rate)
    owner = Client(app_url, verbose=False, download_files=False)
    token = "the-owners-own-token-0123456789"
    job = owner.submit(
        handle_file(str(examples_dir / "fashion_blogger.jpg")), handle_file(str(speech)), "", "", "Full",
        0.5, 6, 1, "tiny", 1e-3, SMALL, "bf16", False, token, api_name="/generate",
    )  # fmt: skip
    base = app_url.rstrip("/")
    stopped, streams_checked = None, False
    for count, outputs in enumerate(filter(is_step, job), start=1):  # one per chunk
        if count == 1:
            for data in ([None], ["x" * 32], [token]):
                assert join_as(app_url, owner.session_hash, "stop", data).status_code == 403
                assert join_as(app_url, owner.session_hash, "recalibrate", data).status_code == 403
            body = {
                "session_hash": owner.session_hash,
                "fn_index": fn_index(app_url, "generate"),
                "event_id": "",
            }
            assert httpx.post(base + "/gradio_api/cancel", json=body, timeout=60).status_code == 403
            for path in (
                f"/gradio_api/queue/data?session_hash={owner.session_hash}",
                f"/gradio_api/heartbeat/{owner.session_hash}",
            ):
                refused = httpx.get(base + path, timeout=60)
                assert refused.status_code == 403 and "belongs to another client" in refused.text, path
        url = stream_url(outputs)
        if url is not None and not streams_checked:
            streams_checked = True
            for whole in (url, url.replace("playlist.m3u8", "playlist-file")):
                assert httpx.get(whole, timeout=60).status_code == 403
                assert httpx.get(whole, cookies=owner.cookies, timeout=60).status_code == 200
        if count == 4 and stopped is None:
            stopped = owner.predict(token, api_name="/stop")
    assert job.status().success and stopped is not None and streams_checked
    files, report = stopped
    chunks = report["runs"]["Full"]["chunks"]
    # Stopped by the owner, at chunk 4 or 5, not by the intruder after chunk 1 (it would end at 2 or 3).
    assert report["stopped_early"] and 4 <= len(chunks) < 8
    owner.close()


def wait_until(condition, what: str, limit_s: float = 120.0) -> None:
    """Poll `condition` (a guard against a hang, not a speed limit)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_a_dropped_heartbeat_ends_nothing_while_the_pages_own_is_open(
    app_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the served app: someone opens and drops a heartbeat for the page's session hash; Gradio fires the
    unload, the app leaves the page's run alone. When the page's own heartbeat ends, the run goes."""
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.2")  # Gradio notices a gone client at its next beat
    unloads: list[str] = []
    counted = main.HEARTBEATS.count
    monkeypatch.setattr(main.HEARTBEATS, "count", lambda s: unloads.append(s) or counted(s))
    token = main.issue_owner_token(gr.Request(session_hash="watched-page"))
    run_dir = RunDir()
    main.SESSIONS.begin_run(token, run_dir, [])
    heartbeat = app_url.rstrip("/") + "/gradio_api/heartbeat/watched-page"
    page_closes = threading.Event()

    def page() -> None:
        with httpx.stream("GET", heartbeat, timeout=60) as response:
            for _ in response.iter_lines():
                if page_closes.is_set():
                    return

    page_thread = threading.Thread(target=page)
    page_thread.start()
    wait_until(lambda: counted("watched-page") == 1, "the page's heartbeat")
    with httpx.stream("GET", heartbeat, timeout=60) as response:
        next(response.iter_lines())  # the intruder's heartbeat is up; it drops it here
    wait_until(lambda: "watched-page" in unloads, "Gradio's unload for the dropped heartbeat")
    assert main.SESSIONS.run(token) is not None and run_dir.path.exists()

    page_closes.set()
    page_thread.join()
    # The unload forgets the owner, then deletes its folder: wait for the last step.
    wait_until(lambda: not run_dir.path.exists(), "the page's close")
    assert main.SESSIONS.run(token) is None
