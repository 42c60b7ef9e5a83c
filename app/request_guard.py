"""ASGI middleware in front of Gradio's routes, for a public Space.

- Every request body is checked against `app.upload_budget` before Gradio reads it: its declared size, and for
  uploads (`/upload`, or any multipart form) the temp folder's budget and the client's.
- Gradio's `/cancel` stops the event of whatever session hash and function index a client names; for the
  generation events it is refused (Stop is `/stop`, which needs the run's owner token; see `app.sessions`).
- Open `/heartbeat/<session>` connections are counted per session, so that a page's close (Gradio's unload,
  which fires when any heartbeat of that session hash ends) is acted on only when no heartbeat of it is left:
  a client that opens and drops a heartbeat for someone else's session hash does not end that page's runs.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from pathlib import Path
from typing import Any

from starlette.responses import PlainTextResponse

from app.upload_budget import ClientBudget, UploadLimits, disk_refusal, request_refusal

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_HEARTBEAT = re.compile(r"/gradio_api/heartbeat/([^/]+)/?$")
_CANCEL = re.compile(r"/gradio_api/cancel/?$")
_UPLOAD = re.compile(r"/gradio_api/upload/?$")
_BODY_METHODS = {"POST", "PUT", "PATCH"}
MAX_CANCEL_BODY = 64 * 1024
MAX_DRAIN_BYTES = 128 * 1024 * 1024
CANCEL_REFUSAL = (
    "A run is stopped with the Stop button (the /stop endpoint, with the run's owner token), "
    "not by Gradio's /cancel."
)
CANCEL_INDEX_REFUSAL = "A /cancel request must name its event by a whole number (fn_index)."


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
    indices of the generation events (read when a /cancel arrives, after the app is built)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limits: UploadLimits,
        budget: ClientBudget,
        temp_root: Callable[[], Path],
        protected_fns: Callable[[], Collection[int]],
        heartbeats: OpenHeartbeats = HEARTBEATS,
        trust_forwarded: bool = False,
    ) -> None:
        self.app = app
        self.limits = limits
        self.budget = budget
        self.temp_root = temp_root
        self.protected_fns = protected_fns
        self.heartbeats = heartbeats
        self.trust_forwarded = trust_forwarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        heartbeat = _HEARTBEAT.search(path)
        if heartbeat is not None and method == "GET":
            await self._heartbeat(heartbeat.group(1), scope, receive, send)
            return
        if method in _BODY_METHODS:
            refusal = self._body_refusal(scope, path)
            if refusal is not None:
                status, message = refusal
                await _drain(receive)
                await PlainTextResponse(message, status_code=status)(scope, receive, send)
                return
            if _CANCEL.search(path):
                await self._cancel(scope, receive, send)
                return
        await self.app(scope, receive, send)

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
        is_upload = _UPLOAD.search(path) is not None or headers.get(b"content-type", b"").startswith(
            b"multipart/form-data"
        )
        if not is_upload:  # an event's JSON body: only the per-request cap
            return None
        message = disk_refusal(self.temp_root(), declared, self.limits)
        if message is not None:
            return 507, message
        message = self.budget.spend(client_address(scope, self.trust_forwarded), declared)
        return None if message is None else (429, message)

    async def _cancel(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse /cancel for a generation event; hand any other on with its body replayed."""
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_CANCEL_BODY:
                await PlainTextResponse("This /cancel request is too large.", 413)(scope, receive, send)
                return
        try:
            fn_index = json.loads(body).get("fn_index")
        except (ValueError, AttributeError):
            fn_index = None
        # Gradio coerces what it is sent ("1", 1.0, true all cancel event 1): only a plain integer, or none, is
        # compared with the protected events; any other form is refused outright.
        if fn_index is not None and (isinstance(fn_index, bool) or not isinstance(fn_index, int)):
            await PlainTextResponse(CANCEL_INDEX_REFUSAL, status_code=400)(scope, receive, send)
            return
        if fn_index in set(self.protected_fns()):
            await PlainTextResponse(CANCEL_REFUSAL, status_code=403)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

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
