"""The FastAPI app: the API families' routes, health and metrics, every request through the gate
(request id, API key, body limits, metrics, the last word on failures), errors as OpenAI's body."""

from __future__ import annotations

import contextlib

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from qwen3_jax.serve import cohere_api, openai_api, tei_api, vllm_api
from qwen3_jax.serve.errors import APIError, api_error, error_response, http_error, invalid_request
from qwen3_jax.serve.gate import Gate
from qwen3_jax.serve.service import Service


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

    app = FastAPI(title="qwen3-jax", lifespan=lifespan)
    app.state.service = service
    for api in (openai_api, tei_api, cohere_api, vllm_api):
        app.include_router(api.router)

    @app.get("/health")                      # health, ping and metrics need no API key, as in vLLM
    async def health() -> JSONResponse:
        problem = service.health()
        if problem is not None:
            return error_response(503, problem, code="unavailable")
        return JSONResponse({"status": "ok", "models": [name for name, _ in service.served()]})

    @app.get("/ping")                        # SageMaker's and vLLM's health check
    async def ping() -> JSONResponse:
        return await health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    settings = service.settings
    app.add_middleware(Gate, metrics=service.metrics, api_key=settings.api_key, payload_limit=settings.payload_limit,
                       read_timeout_s=settings.read_timeout_s)
    return app
