"""Errors as every API family here reports them: an HTTP status and OpenAI's error body,
`{"error": {"message", "type", "param", "code"}}`, one line that says what to do."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

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
