"""A session hash belongs to the client that used it first; the page's hidden events are the page's; uploads are
budgeted in files too; the temp folder is not walked per request. The stranger's requests of issue 23 (items 2 to
5) are replayed against the guard in front of a small app that answers like Gradio's routes."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from app import main, upload_budget
from app.client_binding import COOKIE_NAME, SessionBindings
from app.request_guard import EVENT_INDEX_REFUSAL, PRIVATE_REFUSAL, SESSION_REFUSAL
from app.sessions import FEED_KEEP_SECONDS, Sessions
from app.upload_budget import TempUsage, UploadLimits

PUBLIC, PRIVATE = 1, 11  # event ids of the small app: 1 is public (/generate), 11 hidden (issue_owner_token)
HASH = "victims-session-hash"
STREAM = f"/gradio_api/stream/{HASH}/run-1/7"
ELSEWHERE = ("203.0.113.9", 40000)  # a raw HTTP client on another machine (no cookie: known by its address)


async def reached(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"reached {len(await request.body())}")


async def call(request: Request) -> JSONResponse:
    return JSONResponse({"event_id": "event-of-the-caller"})


ROUTES = [
    Route(path, reached, methods=["GET", "POST"])
    for path in (
        "/",
        "/config",
        "/gradio_api/queue/join",
        "/gradio_api/queue/data",
        "/gradio_api/run/{name}",
        "/gradio_api/cancel",
        "/gradio_api/upload",
        "/gradio_api/heartbeat/{session}",
        "/gradio_api/stream/{session}/{run}/{component}/{name}",
        "/gradio_api/call/{api}/{event}",
    )
] + [Route("/gradio_api/call/{api}", call, methods=["POST"])]


def small_demo() -> SimpleNamespace:
    """What `main.request_guard` reads of a demo: its event table."""
    fns = {
        PUBLIC: SimpleNamespace(fn=main.generate, api_name="generate", api_visibility="public"),
        PRIVATE: SimpleNamespace(
            fn=main.issue_owner_token, api_name="issue_owner_token", api_visibility="private"
        ),
    }
    return SimpleNamespace(fns=fns)


@pytest.fixture
def app(tmp_path: Path) -> Starlette:
    limits = UploadLimits(temp_budget_bytes=10**12, min_free_bytes=0)
    return Starlette(routes=ROUTES, middleware=[main.request_guard(small_demo(), limits)])


def page(app: Starlette) -> TestClient:
    """A browser: it loads the page, which hands it the client cookie."""
    client = TestClient(app)
    loaded = client.get("/")
    assert COOKIE_NAME in loaded.cookies
    return client


def join(client: TestClient, fn_index: object, session: str = HASH, **extra: object) -> object:
    body = {"data": [], "fn_index": fn_index, "session_hash": session} | extra
    return client.post("/gradio_api/queue/join", json=body)


def test_a_session_hash_is_served_only_to_the_client_that_opened_it(app: Starlette) -> None:
    owner = page(app)
    assert join(owner, PUBLIC).text.startswith("reached")
    stranger_urls = [
        f"/gradio_api/queue/data?session_hash={HASH}",
        f"/gradio_api/heartbeat/{HASH}",
        f"{STREAM}/playlist.m3u8",
        f"{STREAM}/segment-0.ts",
        f"{STREAM}/playlist-file",
        f"/gradio_api/queue/data?session_hash=own-hash&session_hash={HASH}",
    ]
    strangers = (
        page(app),
        TestClient(app, client=ELSEWHERE),
        TestClient(app, cookies={COOKIE_NAME: "m" * 32}),
    )
    for stranger in strangers:
        for url in stranger_urls:
            refused = stranger.get(url)
            assert refused.status_code == 403 and refused.text == SESSION_REFUSAL, url
        for path, body in (
            ("/gradio_api/queue/join", {"data": [], "fn_index": PUBLIC, "session_hash": HASH}),
            ("/gradio_api/run/predict", {"data": [], "fn_index": 0, "session_hash": HASH}),
            ("/gradio_api/cancel", {"fn_index": 0, "session_hash": HASH, "event_id": "e"}),
        ):
            refused = stranger.post(path, json=body)
            assert refused.status_code == 403 and refused.text == SESSION_REFUSAL, path
    for url in stranger_urls[:-1]:  # the owner still gets all of it
        assert owner.get(url).text == "reached 0", url
    # A client without the cookie (raw HTTP) is known by its address, and keeps its own session hashes.
    raw = TestClient(app)
    assert join(raw, PUBLIC, session="raw-clients-hash").text.startswith("reached")
    assert raw.get("/gradio_api/heartbeat/raw-clients-hash").text == "reached 0"
    assert owner.get("/gradio_api/heartbeat/raw-clients-hash").status_code == 403


def test_the_cookie_is_handed_out_with_the_page_and_config_only(app: Starlette) -> None:
    fresh = TestClient(app)
    assert COOKIE_NAME not in fresh.get("/gradio_api/heartbeat/some-hash").cookies
    config = fresh.get("/config")  # where gradio_client takes the cookies it sends with every later request
    assert COOKIE_NAME in config.cookies and "HttpOnly" in config.headers["set-cookie"]
    assert "set-cookie" not in fresh.get("/").headers  # it has one now


def test_a_call_results_stream_belongs_to_its_caller(app: Starlette) -> None:
    caller, stranger = page(app), page(app)
    started = caller.post("/gradio_api/call/generate", json={"data": []})
    assert started.json() == {"event_id": "event-of-the-caller"}
    results = "/gradio_api/call/generate/event-of-the-caller"
    assert stranger.get(results).status_code == 403
    assert caller.get(results).text == "reached 0"


def test_hidden_events_are_the_pages_alone(app: Starlette) -> None:
    api_client = TestClient(app)
    api_client.get("/config")  # gradio_client: a cookie, but never the page
    for n, client in enumerate((api_client, TestClient(app, client=ELSEWHERE))):
        own = f"hash-of-client-{n}"
        refused = join(client, PRIVATE, session=own)
        assert refused.status_code == 403 and refused.text == PRIVATE_REFUSAL
        by_name = client.post("/gradio_api/run/issue_owner_token", json={"data": [], "session_hash": own})
        assert by_name.status_code == 403 and by_name.text == PRIVATE_REFUSAL
        assert join(client, PUBLIC, session=own).text.startswith("reached")
        for coerced in (str(PRIVATE), float(PRIVATE), True):  # forms Gradio would coerce to an event
            refused = join(client, coerced, session=own)
            assert refused.status_code == 400 and refused.text == EVENT_INDEX_REFUSAL, coerced
    browser = page(app)
    assert join(browser, PRIVATE, session="the-pages-hash").text.startswith("reached")
    assert browser.post(
        "/gradio_api/run/predict", json={"data": [], "fn_index": PRIVATE, "session_hash": "the-pages-hash"}
    ).text.startswith("reached")


def test_live_mode_acts_only_with_the_token_issued_to_the_page_that_sends_it() -> None:
    page_request = gr.Request(session_hash="live-page")
    token = main.issue_owner_token(page_request)
    made_up = "a-token-the-stranger-chose-0123"
    before = main.SESSIONS.owners()
    for request, owner_token in (
        (gr.Request(session_hash="strangers-page"), made_up),
        (gr.Request(session_hash="strangers-page"), token),  # the page's token, from another session hash
        (page_request, made_up),
    ):
        main.open_live_feed(owner_token, request)
        with pytest.raises(gr.Error, match="Live mode works only from the page"):
            next(
                main.generate_live(
                    None, "", "ISPA", 0.5, 6, 1, "tiny", owner_token=owner_token, request=request
                )
            )
    assert main.SESSIONS.owners() == before and main.SESSIONS.feed(token) is None
    main.open_live_feed(token, page_request)
    feed = main.SESSIONS.feed(token)
    assert feed is not None and not feed.closed
    main.close_live_feed(token, gr.Request(session_hash="strangers-page"))
    assert not feed.closed
    main.close_live_feed(token, page_request)
    assert feed.closed
    main.SESSIONS.end_page("live-page")


def test_a_feed_left_open_is_closed_and_swept() -> None:
    now = [0.0]
    sessions = Sessions(max_idle_seconds=3600.0, clock=lambda: now[0])
    token = sessions.issue_token("page-that-never-closes")  # no heartbeat, so no unload ever comes
    feed = sessions.open_feed(token)
    now[0] = FEED_KEEP_SECONDS - 1
    assert sessions.sweep() == 0 and not feed.closed  # a recording may still be going on
    now[0] = FEED_KEEP_SECONDS + 1
    assert sessions.sweep() == 0 and feed.closed  # closed; the token is an hour's idle page token now
    now[0] = FEED_KEEP_SECONDS + 3601
    assert sessions.sweep() == 1 and sessions.owners() == 0


# ------------------------------------------------------------------------------------------------- item 5
def test_four_hundred_tiny_uploads_are_refused_before_the_four_hundredth(app: Starlette) -> None:
    client = TestClient(app)
    statuses = [client.post("/gradio_api/upload", content=b"t" * 16).status_code for _ in range(400)]
    assert statuses.index(429) == 300 and set(statuses[300:]) == {429}
    refused = client.post("/gradio_api/upload", content=b"t" * 16)
    assert "You have uploaded 300 files in the last 10 minutes" in refused.text


def test_every_part_of_a_multipart_upload_counts_as_a_file(app: Starlette) -> None:
    client = TestClient(app)
    files = [("files", (f"{i}.bin", b"f" * 16)) for i in range(290)]
    assert client.post("/gradio_api/upload", files=files).text.startswith("reached")
    statuses = [
        client.post("/gradio_api/upload", files={"files": ("x.bin", b"x")}).status_code for _ in range(12)
    ]
    assert statuses == [200] * 10 + [429, 429]


def test_the_temp_folder_is_walked_once_then_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walks: list[Path] = []
    real_walk = upload_budget.folder_bytes
    monkeypatch.setattr(upload_budget, "folder_bytes", lambda root: walks.append(root) or real_walk(root))
    (tmp_path / "earlier.bin").write_bytes(b"e" * 500)
    now = [0.0]
    usage = TempUsage(lambda: tmp_path, every_seconds=10.0, clock=lambda: now[0])
    assert usage.used() == 500 and len(walks) == 1
    for _ in range(50):
        usage.add(16)
    assert usage.used() == 500 + 800 and len(walks) == 1  # counted, not walked
    (tmp_path / "run.mp4").write_bytes(b"r" * 1000)  # a run's files appear without an upload
    now[0] = 11.0
    usage.used()  # stale: a walk starts on another thread, this call does not wait for it
    for thread in [t for t in threading.enumerate() if t.name == "temp-usage"]:
        thread.join()
    assert len(walks) == 2 and usage.used() == 1500  # the walk saw the uploads' and the run's bytes


def test_bindings_forget_unused_sessions_and_stay_bounded() -> None:
    now = [0.0]
    bindings = SessionBindings(keep_seconds=100.0, max_entries=3, clock=lambda: now[0])
    assert bindings.claim("a", "client-1") and not bindings.claim("a", "client-2")
    now[0] = 101.0
    assert bindings.claim("a", "client-2")  # unused for longer than kept: anyone's again
    for name in "bcd":
        bindings.claim(name, "client-3")
    assert bindings.sessions() == 3 and bindings.owner("a") is None  # the least recently used went first


def test_the_served_guard_is_wired_with_the_file_budget() -> None:
    guard = main.request_guard(small_demo())
    assert guard.kwargs["budget"].limit_files == 300 and guard.kwargs["usage"] is main.TEMP_USAGE
    assert guard.kwargs["private_events"]() == ({PRIVATE}, {"issue_owner_token"})
