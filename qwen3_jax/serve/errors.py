"""Errors as every API family here reports them: an HTTP status and OpenAI's error body,
`{"error": {"message", "type", "param", "code"}}`, one line that says what to do."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                499: "client_closed_request", 503: "service_unavailable", 500: "server_error"}


class APIError(Exception):
    """A request the server answers with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": STATUS_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def api_error(request: Request, error: APIError) -> JSONResponse:
    return error_response(error.status, error.message, code=error.code, param=error.param, headers=error.headers)


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """A body that is not JSON, or fields of the wrong type: 422, naming the first problem."""
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return error_response(422, f"{message}; see the API's documentation for the fields it takes",
                          code="invalid_request", param=where or None)


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    return error_response(500, f"the server failed on this request ({type(error).__name__}: {error})",
                          code="internal_error")
