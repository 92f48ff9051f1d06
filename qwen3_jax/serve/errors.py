"""Errors as every API family here reports them: an HTTP status and OpenAI's error body,
`{"error": {"message", "type", "param", "code"}}`, one line that says what to do. REFUSALS is the one
table from the engines' typed errors to each family's status and body; each family's router maps what
escapes its endpoints through it (`family_route`)."""

from __future__ import annotations

from typing import Callable, NamedTuple

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from qwen3_jax.engine.errors import Invalid, NotServed, RequestTooLarge, TooManyCharacters
from qwen3_jax.serve.scheduler import BatchFailed, Overloaded, ShuttingDown
from qwen3_jax.serve.service import ClientGone
from qwen3_jax.tokenization import TooLong

STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
                503: "service_unavailable", 500: "server_error"}
STATUS_CODES = {404: "not_found", 405: "method_not_allowed"}


class APIError(Exception):
    """A request the server answers with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": STATUS_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code=code, param=param), status_code=status, headers=headers)


async def api_error(request: Request, error: APIError) -> JSONResponse:
    return error_response(error.status, error.message, code=error.code, param=error.param, headers=error.headers)


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """A body that is not JSON, or fields of the wrong type: 422, naming the problem (of a union's
    members, the one a field's own check found, else the one that got furthest into the value)."""
    errors = error.errors() or [{"loc": (), "msg": "invalid request"}]
    first = max(errors, key=lambda e: (e.get("type") == "value_error", len(e.get("loc", ()))))
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body" and not _type_tag(part))
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return error_response(422, f"{message}; see the API's documentation for the fields it takes",
                          code="invalid_request", param=where or None)


def _type_tag(part) -> bool:
    """Whether a part of pydantic's error location names a member of a union type ("str",
    "list[function-after[...]]"), not a field or an index."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "bool", "float", "list", "dict"))


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own answers (an unknown path 404, a wrong method 405, a body that failed to parse 400)
    in the same body as every other error."""
    hints = {404: f"no endpoint {request.url.path}: see GET /docs for the ones this server has",
             405: f"{request.method} is not allowed on {request.url.path}"}
    message = hints.get(error.status_code, f"{error.detail}: send a JSON object as the API's documentation says")
    return error_response(error.status_code, message, code=STATUS_CODES.get(error.status_code, "invalid_request"),
                          headers=getattr(error, "headers", None))


class Refusal(NamedTuple):
    """How one type of error is answered: `status` by API family ("*": every family not named), the
    body's `code` (None: the error's own reason), its message, and its headers."""

    status: dict[str, int]
    code: str | None
    message: Callable[[Exception], str] = str
    headers: Callable[[Exception], dict[str, str] | None] = lambda error: None


# The first type an error is an instance of answers it (a subclass before its base).
REFUSALS: dict[type, Refusal] = {
    TooLong: Refusal({"tei": 413, "*": 400}, "context_length_exceeded",
                     lambda e: f"{e.what}: shorten them, or send truncate=true to cut them to the limit"),
    NotServed: Refusal({"*": 404}, None),
    TooManyCharacters: Refusal({"tei": 413, "*": 400}, None),
    Invalid: Refusal({"*": 400}, None),
    RequestTooLarge: Refusal({"*": 413}, "request_too_large",
                             lambda e: f"the request holds {e.tokens} tokens, more than this server queues at once "
                                       f"({e.limit}, --max-queue-tokens): split it"),
    Overloaded: Refusal({"*": 429}, "queue_full", headers=lambda e: {"Retry-After": str(e.retry_after)}),
    ShuttingDown: Refusal({"*": 503}, "unavailable", lambda e: f"{e}: send the request elsewhere or later"),
    BatchFailed: Refusal({"*": 500}, "internal_error",
                         lambda e: f"internal error: {e}; the server's log has the details"),
    ClientGone: Refusal({"*": 499}, "client_closed",
                        lambda e: "the client closed the connection; its queued work was dropped"),
}


def refusal(error: Exception, family: str) -> APIError:
    """`error` (of a type in REFUSALS) as API family `family` ("openai", "tei", "cohere", "vllm") answers it."""
    answer = next(answer for kind, answer in REFUSALS.items() if isinstance(error, kind))
    status = answer.status.get(family, answer.status["*"])
    param = error.param if isinstance(error, Invalid) else "input" if isinstance(error, TooLong) else None
    return APIError(status, answer.message(error), code=answer.code or error.reason, param=param,
                    headers=answer.headers(error))


def family_route(family: str) -> type[APIRoute]:
    """The route class of API family `family`'s router: an error of a type in REFUSALS that escapes one
    of its endpoints is answered as `refusal` says."""
    class FamilyRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def answer(request: Request):
                try:
                    return await handler(request)
                except tuple(REFUSALS) as error:
                    raise refusal(error, family) from None
            return answer
    return FamilyRoute
