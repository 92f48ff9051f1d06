"""What every request passes before an endpoint sees it, and the last word on how it ended.

One ASGI middleware, outside FastAPI's routing: it names the request (`x-request-id`, the client's or a
new one, on every response), checks the API key before a byte of the body is read, reads the body
itself under `--payload-limit` (a larger Content-Length is refused unread; a chunked body is cut off at
the limit) and `--read-timeout-s` (a body not whole by then is answered 408), holds at most
BODIES_IN_FLIGHT bodies' worth of bytes at once (429 beyond), counts every status in the metrics under
the endpoint asked for (the route FastAPI chose, or for a request the gate refused, the one its path
and method name), and
answers any exception that escapes an endpoint with a 500 that names the request id and nothing of the
server's internals (the traceback goes to the log under that id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import uuid

from starlette.routing import Match

from qwen3_jax.serve.errors import error_body
from qwen3_jax.serve.metrics import Metrics

log = logging.getLogger("qwen3_jax.serve")

PUBLIC_PATHS = ("/health", "/metrics", "/ping")      # no API key needed, as in vLLM and TEI
BODIES_IN_FLIGHT = 32                                # payload limits' worth of request bodies held at once
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class Refused(Exception):
    """A request answered by the gate itself: status, message, code and headers of its error body."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class Gate:
    """The middleware described in the module docstring, around `app`."""

    def __init__(self, app, *, metrics: Metrics, api_key: str | None, payload_limit: int, read_timeout_s: float):
        self.app, self.metrics, self.api_key = app, metrics, api_key
        self.payload_limit, self.read_timeout_s = payload_limit, read_timeout_s
        self.body_budget = BODIES_IN_FLIGHT * payload_limit
        self.bytes_held = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        request_id = given if given and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status, started, held = [0], time.perf_counter(), [0]

        async def send_named(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        with self.metrics.in_flight.track_inprogress():
            try:
                self._authorize(scope)
                body = await self._read_body(scope, receive, held)
                await self.app(scope, _replay(body, receive), send_named)
            except Refused as refused:
                if refused.status == 499:                   # nobody is left to answer
                    status[0] = 499
                    return
                # The body may be unread: the connection cannot carry another request.
                await _answer(send_named, refused.status, refused.message, refused.code,
                              {**refused.headers, "connection": "close"})
            except Exception:  # noqa: BLE001 - the client gets a 500 that names the request, the log the rest
                log.exception("request %s (%s %s) failed", request_id, scope["method"], scope["path"])
                if not status[0]:
                    await _answer(send_named, 500, f"internal error: the server failed on this request; its log "
                                  f"names it as request {request_id}", "internal_error")
            finally:
                self.bytes_held -= held[0]
                endpoint = _endpoint(scope)
                self.metrics.requests.labels(endpoint, str(status[0] or 499)).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    def _authorize(self, scope) -> None:
        if not self.api_key or scope["path"] in PUBLIC_PATHS:
            return
        given = _header(scope, b"authorization") or ""
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise Refused(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                          "invalid_api_key", {"www-authenticate": "Bearer"})

    async def _read_body(self, scope, receive, held: list[int]) -> bytes:
        """The whole body, within the payload limit, the read timeout and the bytes all bodies may hold."""
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.payload_limit):
            raise Refused(413, f"the request body ({declared} bytes) is over this server's limit of "
                          f"{self.payload_limit} bytes (--payload-limit): send fewer or shorter texts at a time",
                          "payload_too_large")
        self._hold(int(declared or 0), held)
        chunks, size = [], 0
        deadline = time.perf_counter() + self.read_timeout_s          # for the whole body, not each part
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.perf_counter(), 0))
            except asyncio.TimeoutError:
                raise Refused(408, f"the request body did not arrive within {self.read_timeout_s:g} s "
                              "(--read-timeout-s): send it whole", "request_timeout") from None
            if message["type"] == "http.disconnect":
                raise Refused(499, "the client closed the connection while sending", "client_closed")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.payload_limit:
                raise Refused(413, f"the request body is over this server's limit of {self.payload_limit} bytes "
                              "(--payload-limit): send fewer or shorter texts at a time", "payload_too_large")
            if size > held[0]:
                self._hold(size - held[0], held)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _hold(self, count: int, held: list[int]) -> None:
        if count and self.bytes_held + count > self.body_budget:
            raise Refused(429, f"the server is holding {self.bytes_held} bytes of request bodies (the limit is "
                          f"{self.body_budget}); retry in 1 s", "queue_full", {"retry-after": "1"})
        self.bytes_held += count
        held[0] += count


def _endpoint(scope) -> str:
    """The path of the route a request was for: the one FastAPI routed it to, else (refused before
    routing) the app's route that its path and method match; "unknown" for a path the app has not."""
    route = scope.get("route")
    if route is None:
        routes = scope["app"].router.routes if "app" in scope else []
        route = next((r for r in routes if r.matches(scope)[0] == Match.FULL), None) \
            or next((r for r in routes if r.matches(scope)[0] == Match.PARTIAL), None)
    return route.path if route is not None else "unknown"


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _replay(body: bytes, receive):
    """A receive() that gives the body read already, then what the connection sends (its disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed


async def _answer(send, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(error_body(status, message, code=code)).encode()
    fields = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    fields += [(key.encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": payload})
