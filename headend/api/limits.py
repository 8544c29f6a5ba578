"""What the API takes from a client before it does any work: a token first, a bounded body in
bounded time, headers in bounded time, a bounded number of requests at once.

- `RequestLimits` (ASGI middleware) answers 401 before reading a byte of the body of a
  request without a valid token (a 300 MiB upload is not read to be refused), 413 for a body
  over `max_body` (by Content-Length at once, or as soon as a chunked body passes it), and
  408 for a body that does not arrive within `body_timeout`. The body is read here, bounded,
  and handed to the application as it came.
- `GuardedH11Protocol` closes a connection whose request headers have not all arrived
  within `header_timeout` (uvicorn times out only idle keep-alive connections: a client
  trickling headers held one for minutes).
- At most `max_in_flight` requests are worked on at once (503 beyond), counted after the
  token check: idle or unauthenticated connections never use up the budget (uvicorn's own
  `limit_concurrency` counts connections, so 200 idle sockets answered everyone 503).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Collection
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from headend.api.auth import TokenStore

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    def __init__(self, app: Any, tokens: TokenStore, *, public: Collection[str], max_body: int,
                 body_timeout: float, max_in_flight: int = 200) -> None:  # fmt: skip
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.tokens = tokens
        self.public = frozenset(public)
        self.max_body = max_body
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        if scope["path"] not in self.public and not self._authenticated(headers.get(b"authorization", b"")):
            await _answer(send, 401, "missing or unknown bearer token", [(b"www-authenticate", b"Bearer")])
            return
        if self.in_flight >= self.max_in_flight:
            await _answer(send, 503, f"more than {self.max_in_flight} requests at once; try again shortly",
                          [(b"retry-after", b"1")])  # fmt: skip
            return
        self.in_flight += 1
        try:
            await self._serve(scope, receive, send, headers)
        finally:
            self.in_flight -= 1

    async def _serve(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes]) -> None:
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _answer(send, 413, f"request body over {self.max_body} bytes")
            return
        try:
            async with asyncio.timeout(self.body_timeout):
                body, more = await self._read(receive)
        except TimeoutError:
            await _answer(send, 408, f"request body not received within {self.body_timeout:g} s")
            return
        if more is None:
            await _answer(send, 413, f"request body over {self.max_body} bytes")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> tuple[bytes, bool | None]:
        """The whole body, or (what came, None) once it passes `max_body`."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    def _authenticated(self, header: bytes) -> bool:
        scheme, _, token = header.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and bool(token) and self.tokens.authenticate(token.strip()) is not None


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that does not finish its request headers
    within `header_timeout` seconds (of connecting, or of its previous response)."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        armed_for = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow, armed_for)

    def _headers_too_slow(self, armed_for: object) -> None:
        if self.cycle is armed_for and not self.transport.is_closing():
            self.transport.close()  # no new request completed its headers in time

    def on_response_complete(self) -> None:
        # Armed before super(): that may already start a pipelined request whose headers are
        # complete, and its cycle must count as the new request, not as the one waited for.
        self._header_timer.cancel()
        self._arm()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)
