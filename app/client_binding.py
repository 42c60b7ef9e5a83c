"""Which client a Gradio session hash belongs to, so that nobody else can read that session's messages or streams.

Gradio's session hash is chosen by the client and appears in URLs (`/stream/<session>/…`, `/heartbeat/<session>`),
so anyone who saw one could read that session's event stream (`/queue/data`), its videos, or drop its heartbeat.
Here a session hash belongs to the *client* that used it first, and every later request naming it must come from
that client. A client is named by its *client key*:

- the `ispa_client` cookie, which the server sets on the page (`GET /`) and on `/config` (where gradio_client
  takes the cookies it sends with every later request), so a browser and gradio_client carry it unchanged;
- for a request without that cookie (a raw HTTP client, a browser that refuses the cookie), its address.

The cookie's value is a random secret, like the owner token: it is not signed, because the server never needs to
tell its own values from made-up ones; a made-up value names only its maker. Keys that loaded the page are
remembered as *page clients*: the page's hidden events are theirs alone (see `app.request_guard`).
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

COOKIE_NAME = "ispa_client"
COOKIE_BYTES = 24
KEEP_SECONDS = 24 * 3600.0  # a binding unused this long is forgotten
MAX_ENTRIES = 100_000  # beyond this the least recently used bindings go first
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{32,128}")


def cookie_key(headers: Mapping[bytes, bytes]) -> str | None:
    """The client key a request's `ispa_client` cookie names, or None when it carries no well-formed one."""
    raw = headers.get(b"cookie", b"").decode("latin-1")
    for part in raw.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE_NAME and _COOKIE_VALUE.fullmatch(value):
            return f"cookie:{value}"
    return None


def address_key(address: str) -> str:
    return f"address:{address}"


def new_cookie(cross_site: bool) -> tuple[str, bytes]:
    """A fresh client key and the Set-Cookie header value that hands it out. `cross_site`: the page is shown in
    another site's frame (a Hugging Face Space), where only a Secure, SameSite=None cookie is kept (Partitioned:
    per embedding site, where browsers block third-party cookies)."""
    value = secrets.token_urlsafe(COOKIE_BYTES)
    attributes = "Path=/; HttpOnly; " + (
        "Secure; SameSite=None; Partitioned" if cross_site else "SameSite=Lax"
    )
    return f"cookie:{value}", f"{COOKIE_NAME}={value}; {attributes}".encode("latin-1")


class _Recent:
    """A bounded, thread-safe map whose entries expire when unused for `keep_seconds`."""

    def __init__(self, keep_seconds: float, max_entries: int, clock: Callable[[], float]) -> None:
        self.keep_seconds = keep_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[Any, float]] = OrderedDict()

    def setdefault(self, name: str, value: Any) -> Any:
        """The value stored under `name` (stored as `value` when absent or expired), marked as just used."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            stored = self._entries.pop(name, None)
            kept = value if stored is None else stored[0]
            self._entries[name] = (kept, now)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return kept

    def get(self, name: str) -> Any:
        now = self._clock()
        with self._lock:
            self._expire(now)
            stored = self._entries.get(name)
            return None if stored is None else stored[0]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _expire(self, now: float) -> None:
        while self._entries:
            name, (_, used) = next(iter(self._entries.items()))
            if now - used <= self.keep_seconds:
                return
            del self._entries[name]


class SessionBindings:
    """Session hash → the client key that used it first; and the client keys that loaded the page."""

    def __init__(
        self,
        keep_seconds: float = KEEP_SECONDS,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._owners = _Recent(keep_seconds, max_entries, clock)
        self._pages = _Recent(keep_seconds, max_entries, clock)

    def claim(self, session: str, client: str) -> bool:
        """Whether `client` may use `session`: yes when it is the first to use it, or the one that did."""
        return self._owners.setdefault(session, client) == client

    def owner(self, session: str) -> str | None:
        return self._owners.get(session)

    def loaded_page(self, client: str) -> None:
        self._pages.setdefault(client, True)

    def is_page(self, client: str) -> bool:
        return bool(self._pages.get(client))

    def sessions(self) -> int:
        return len(self._owners)
