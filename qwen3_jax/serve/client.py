"""What the routes read off an HTTP request and hand down as plain values: the Service of its app, and
the Caller its work is for (its request id, and when its client goes away, read off the ASGI connection)."""

from __future__ import annotations

from fastapi import Request

from qwen3_jax.serve.service import Caller, Service


def service_of(request: Request) -> Service:
    """The Service of the app handling `request` (a FastAPI dependency of every endpoint)."""
    return request.app.state.service


def caller_of(request: Request) -> Caller:
    """The Caller of `request`: the id the gate gave it, and a wait for its client to disconnect."""
    return Caller(request.scope.get("state", {}).get("request_id", "-"), lambda: _disconnected(request))


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read; only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
