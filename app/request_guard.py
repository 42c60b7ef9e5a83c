"""ASGI middleware in front of Gradio's routes, for a public Space.

- Every request body is checked against `app.upload_budget` before Gradio reads it: its declared size, and for
  uploads (`/upload`, or any multipart form) the temp folder's budget and the client's.
- Gradio's `/cancel` stops the event of whatever session hash and function index a client names; for the
  generation events it is refused (Stop is `/stop`, which needs the run's owner token; see `app.sessions`).
- Open `/heartbeat/<session>` connections are counted per session, so that a page's close (Gradio's unload,
  which fires when any heartbeat of that session hash ends) is acted on only when no heartbeat of it is left:
  a client that opens and drops a heartbeat for someone else's session hash does not end that page's runs.
- A session hash belongs to the client that used it first (`app.client_binding`): its event stream
  (`/queue/data`), heartbeat, streamed videos (`/stream/<session>/…`) and the events that name it are refused
  (403) to any other client. The `ispa_client` cookie that names a client is set here, on the page and on
  `/config`.
- The page's hidden events (not part of the API) are refused to a client that never loaded the page.
- Uploads are counted in files as well as bytes: each upload request is one file when let in, and the parts of
  a multipart body beyond the first are counted as they pass.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.responses import PlainTextResponse

from app.client_binding import SessionBindings, address_key, cookie_key, new_cookie
from app.upload_budget import ClientBudget, TempUsage, UploadLimits, disk_refusal, request_refusal

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_HEARTBEAT = re.compile(r"/gradio_api/heartbeat/([^/]+)/?$")
_STREAM = re.compile(r"/gradio_api/stream/([^/]+)/[^/]+/[^/]+/[^/]+$")  # playlists, segments, whole files
_CALL_RESULTS = re.compile(r"/gradio_api/call/(?:v2/)?[^/]+/([^/]+)/?$")  # its event id is its session hash
_SESSION_IN_QUERY = re.compile(r"/gradio_api/(?:queue/data|deep_link)/?$")
_CANCEL = re.compile(r"/gradio_api/cancel/?$")
_UPLOAD = re.compile(r"/gradio_api/upload/?$")
# Events: a JSON body naming a session hash and an event (by fn_index, or by the api name in the path).
_EVENT = re.compile(r"/gradio_api/(?:queue/join|(?:run|api)/([^/]+)|call/(?:v2/)?([^/]+)|cancel)/?$")
_CALL = re.compile(r"/gradio_api/call/")
_PAGE = {"/"}
_COOKIE_PATHS = {"/", "/config", "/config/"}  # the page, and where gradio_client takes its cookies from
_BODY_METHODS = {"POST", "PUT", "PATCH"}
MAX_CANCEL_BODY = 64 * 1024
MAX_EVENT_BODY = 8 * 1024 * 1024  # an event's JSON (files travel by /upload); Gradio's own limit is larger
MAX_DRAIN_BYTES = 128 * 1024 * 1024
CANCEL_REFUSAL = (
    "A run is stopped with the Stop button (the /stop endpoint, with the run's owner token), "
    "not by Gradio's /cancel."
)
CANCEL_INDEX_REFUSAL = "A /cancel request must name its event by a whole number (fn_index)."
EVENT_INDEX_REFUSAL = "An event request must name its event by a whole number (fn_index)."
SESSION_REFUSAL = (
    "This session belongs to another client: a session's messages, heartbeat and videos are served only to "
    "the client that opened it (the browser or API client that first used its session hash)."
)
PRIVATE_REFUSAL = (
    "This event belongs to the app's page and is not part of its API; the API's events are listed on the "
    "page's 'Use via API' view."
)


class OpenHeartbeats:
    """How many heartbeat connections each session hash has open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def opened(self, session: str) -> None:
        with self._lock:
            self._open[session] = self._open.get(session, 0) + 1

    def closed(self, session: str) -> None:
        with self._lock:
            left = self._open.get(session, 0) - 1
            if left > 0:
                self._open[session] = left
            else:
                self._open.pop(session, None)

    def count(self, session: str) -> int:
        with self._lock:
            return self._open.get(session, 0)


HEARTBEATS = OpenHeartbeats()  # the process's one count, read by the unload handler


def client_address(scope: Scope, trust_forwarded: bool) -> str:
    """Who sent the request: the peer address, or behind a trusted proxy (a Hugging Face Space) the address that
    proxy appended last to X-Forwarded-For (entries before it are whatever the client wrote)."""
    if trust_forwarded:
        for name, value in scope.get("headers", []):
            if name == b"x-forwarded-for":
                last = value.decode("latin-1").split(",")[-1].strip()
                if last:
                    return last
    client = scope.get("client")
    return client[0] if client else "unknown"


def behind_space_proxy() -> bool:
    """On a Hugging Face Space (SPACE_ID is set there) every request comes through its proxy."""
    return bool(os.environ.get("SPACE_ID")) or os.environ.get("ISPA_TRUST_PROXY") == "1"


async def _drain(receive: Receive, limit: int = MAX_DRAIN_BYTES) -> None:
    """Read (and drop) a refused request's body, up to `limit` bytes, so that the client, still sending, gets to
    read the refusal instead of a reset connection; nothing of it is stored."""
    received, more = 0, True
    while more and received <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        more = message.get("more_body", False)


class RequestGuard:
    """The middleware; `temp_root` is the folder uploads and run folders go to, `protected_fns` the function
    indices of the generation events, `private_events` the ids and api names of the page's hidden events (both
    read when a request arrives, after the app is built)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limits: UploadLimits,
        budget: ClientBudget,
        temp_root: Callable[[], Path],
        protected_fns: Callable[[], Collection[int]],
        private_events: Callable[[], tuple[Collection[int], Collection[str]]] = lambda: ((), ()),
        heartbeats: OpenHeartbeats = HEARTBEATS,
        bindings: SessionBindings | None = None,
        usage: TempUsage | None = None,
        trust_forwarded: bool = False,
    ) -> None:
        self.app = app
        self.limits = limits
        self.budget = budget
        self.temp_root = temp_root
        self.protected_fns = protected_fns
        self.private_events = private_events
        self.heartbeats = heartbeats
        self.bindings = bindings or SessionBindings()
        self.usage = usage or TempUsage(temp_root)
        self.trust_forwarded = trust_forwarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        client, send = self._client(scope, path, method, send)
        for session in _sessions_named_by_url(scope, path, method):
            if not self.bindings.claim(session, client):
                await _refuse(403, SESSION_REFUSAL, scope, receive, send)
                return
        heartbeat = _HEARTBEAT.search(path)
        if heartbeat is not None and method == "GET":
            await self._heartbeat(heartbeat.group(1), scope, receive, send)
            return
        if method in _BODY_METHODS:
            refusal = self._body_refusal(scope, path)
            if refusal is not None:
                status, message = refusal
                await _refuse(status, message, scope, receive, send)
                return
            event = _EVENT.search(path)
            if event is not None:
                await self._event(event, client, scope, receive, send)
                return
            if self._is_upload(scope, path):
                receive = self._count_parts(scope, receive)
        await self.app(scope, receive, send)

    def _client(self, scope: Scope, path: str, method: str, send: Send) -> tuple[str, Send]:
        """The request's client key, and `send` wrapped to hand out a new cookie where the page or /config goes
        to a client without one."""
        headers = dict(scope.get("headers", []))
        address = address_key(client_address(scope, self.trust_forwarded))
        client = cookie_key(headers)
        if client is None and method == "GET" and path in _COOKIE_PATHS:
            client, cookie = new_cookie(cross_site=self.trust_forwarded)
            plain_send = send

            async def send_with_cookie(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie)]
                await plain_send(message)

            if path in _PAGE:  # a browser that refuses the cookie is then known by its address
                self.bindings.loaded_page(address)
            send = send_with_cookie
        if method == "GET" and path in _PAGE:
            self.bindings.loaded_page(client or address)
        return client or address, send

    def _is_upload(self, scope: Scope, path: str) -> bool:
        content_type = dict(scope.get("headers", [])).get(b"content-type", b"")
        return _UPLOAD.search(path) is not None or content_type.startswith(b"multipart/form-data")

    def _body_refusal(self, scope: Scope, path: str) -> tuple[int, str] | None:
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        try:
            declared = int(length) if length is not None else (None if chunked else 0)
        except ValueError:
            declared = None
        message = request_refusal(declared, self.limits)
        if message is not None:
            return (411 if declared is None else 413), message
        assert declared is not None
        if not self._is_upload(scope, path):  # an event's JSON body: only the per-request cap
            return None
        message = disk_refusal(self.temp_root(), declared, self.limits, used=self.usage.used())
        if message is not None:
            return 507, message
        message = self.budget.spend(client_address(scope, self.trust_forwarded), declared, files=1)
        if message is not None:
            return 429, message
        self.usage.add(declared)
        return None

    def _count_parts(self, scope: Scope, receive: Receive) -> Receive:
        """`receive`, counting a multipart body's parts as they pass; those beyond the first (already counted)
        go to the client's file budget when the body ends."""
        boundary = _multipart_boundary(dict(scope.get("headers", [])).get(b"content-type", b""))
        if boundary is None:
            return receive
        delimiter = b"--" + boundary
        client = client_address(scope, self.trust_forwarded)
        seen, tail, counted = 0, b"", False

        async def counting_receive() -> Message:
            nonlocal seen, tail, counted
            message = await receive()
            if message["type"] == "http.request" and not counted:
                data = tail + message.get("body", b"")
                seen += data.count(delimiter)
                tail = data[-(len(delimiter) - 1) :]
                if not message.get("more_body", False):
                    counted = True
                    self.budget.add_files(client, seen - 2)  # n parts: n + 1 delimiters, one part counted
            return message

        return counting_receive

    async def _event(
        self, event: re.Match[str], client: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """An event request: read its JSON body, refuse it when it names another client's session hash, a
        hidden event from a client that never loaded the page, or (a /cancel) a generation event; else hand it
        on with its body replayed."""
        is_cancel = _CANCEL.search(scope.get("path", "")) is not None
        cap = MAX_CANCEL_BODY if is_cancel else MAX_EVENT_BODY
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > cap:
                if more:
                    await _drain(receive)
                await PlainTextResponse("This event request is too large.", 413)(scope, receive, send)
                return
        try:
            fields = json.loads(body)
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            fields = {}
        refusal = self._event_refusal(fields, event.group(1) or event.group(2), client, is_cancel)
        if refusal is not None:  # the body is read: nothing to drain
            status, message = refusal
            await PlainTextResponse(message, status_code=status)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if _CALL.search(scope.get("path", "")):
            send = self._bind_call(client, send)
        await self.app(scope, replay, send)

    def _event_refusal(
        self, fields: dict[str, Any], api_name: str | None, client: str, is_cancel: bool
    ) -> tuple[int, str] | None:
        fn_index = fields.get("fn_index")
        # Gradio coerces what it is sent ("1", 1.0, true all name event 1): only a plain integer, or none, is
        # compared with the protected and hidden events; any other form is refused outright.
        if fn_index is not None and (isinstance(fn_index, bool) or not isinstance(fn_index, int)):
            return 400, CANCEL_INDEX_REFUSAL if is_cancel else EVENT_INDEX_REFUSAL
        session = fields.get("session_hash")
        if isinstance(session, str) and not self.bindings.claim(session, client):
            return 403, SESSION_REFUSAL
        if is_cancel and fn_index in set(self.protected_fns()):
            return 403, CANCEL_REFUSAL
        private_ids, private_names = self.private_events()
        named = fn_index in set(private_ids) if fn_index is not None else api_name in set(private_names)
        if named and not self.bindings.is_page(client):
            return 403, PRIVATE_REFUSAL
        return None

    def _bind_call(self, client: str, send: Send) -> Send:
        """`send` for Gradio's /call/<api>: the event id it answers with names the results (GET
        /call/<api>/<event id>) and, without a session hash of the caller's, the event's session: bound here."""
        body = b""

        async def binding_send(message: Message) -> None:
            nonlocal body
            if message["type"] == "http.response.body" and len(body) <= MAX_CANCEL_BODY:
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    try:
                        event_id = json.loads(body).get("event_id")
                    except (ValueError, AttributeError):
                        event_id = None
                    if isinstance(event_id, str):
                        self.bindings.claim(event_id, client)
            await send(message)

        return binding_send

    async def _heartbeat(self, session: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the connection from its start until the client is gone (seen by a disconnect message, a
        failing send, or the end of the response, whichever comes first: before Gradio's unload runs)."""
        self.heartbeats.opened(session)
        done = False

        def close_once() -> None:
            nonlocal done
            if not done:
                done = True
                self.heartbeats.closed(session)

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                close_once()
            return message

        async def watched_send(message: Message) -> None:
            try:
                await send(message)
            except BaseException:
                close_once()
                raise

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            close_once()


async def _refuse(status: int, message: str, scope: Scope, receive: Receive, send: Send) -> None:
    await _drain(receive)
    await PlainTextResponse(message, status_code=status)(scope, receive, send)


def _sessions_named_by_url(scope: Scope, path: str, method: str) -> list[str]:
    """The session hashes a GET request names in its path or query: a heartbeat, a stream's playlist, segment or
    whole file, an event stream (`/queue/data`), a deep link, the results of a /call."""
    if method not in ("GET", "HEAD"):
        return []
    for pattern in (_HEARTBEAT, _STREAM, _CALL_RESULTS):
        found = pattern.search(path)
        if found is not None:
            return [found.group(1)]
    if _SESSION_IN_QUERY.search(path):
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        return query.get("session_hash", [])
    return []


def _multipart_boundary(content_type: bytes) -> bytes | None:
    if not content_type.startswith(b"multipart/"):
        return None
    for parameter in content_type.split(b";")[1:]:
        name, _, value = parameter.strip().partition(b"=")
        if name.lower() == b"boundary" and value:
            return value.strip(b'"')
    return None
