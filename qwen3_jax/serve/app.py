"""The FastAPI app: the three API families' routes, health and metrics, the API key, errors as OpenAI's body."""

from __future__ import annotations

import contextlib
import secrets
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from qwen3_jax.serve import openai_api, rerank_api, tei_api
from qwen3_jax.serve.errors import APIError, api_error, error_response, internal_error, invalid_request
from qwen3_jax.serve.service import ClientGone, Service


def create_app(service: Service) -> FastAPI:
    """An app serving `service`'s models; its schedulers start with the app and, when it stops (SIGTERM
    included), finish every request they accepted."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.stop()

    def authorized(request: Request) -> None:
        key = service.settings.api_key
        given = request.headers.get("authorization", "")
        if key and not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="qwen3-jax", lifespan=lifespan)
    app.state.service = service
    for router in (openai_api.router, tei_api.router, rerank_api.router):
        app.include_router(router, dependencies=[Depends(authorized)])

    @app.get("/health")                      # health and metrics need no API key, as in vLLM
    async def health() -> JSONResponse:
        if not service.ready:
            return error_response(503, "not ready: the server is starting or stopping", code="not_ready")
        return JSONResponse({"status": "ok", "models": [name for name, _ in service.served()]})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(ClientGone, lambda request, error: error_response(
        499, "the client closed the connection; its queued work was dropped", code="client_closed"))
    app.add_exception_handler(Exception, internal_error)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        with service.metrics.in_flight.track_inprogress():
            response = await call_next(request)
        route = request.scope.get("route")
        endpoint = route.path if route is not None else "unknown"
        service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        service.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    return app

