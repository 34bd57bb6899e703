"""One error hook for the API: every failure answers `{"code": ..., "message": ...}`, never a bare 500.

Routes that speak another API's dialect (the OpenAI- and AUTOMATIC1111-compatible routers) register
their own error body for their path prefix with `register_dialect`, since their clients parse errors
in their own shapes; status codes and messages stay the same everywhere."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from bot.errors import (
    EaselError,
    IdempotencyConflict,
    InvalidCommand,
    InvalidImage,
    NotFound,
    QueueFull,
    QuotaExceeded,
    Refused,
    Unauthorized,
)

log = logging.getLogger("easel.http")

STATUS_OF: dict[type[EaselError], int] = {
    InvalidCommand: 400, InvalidImage: 400, Unauthorized: 401, Refused: 403, NotFound: 404,
    IdempotencyConflict: 409, QuotaExceeded: 429, QueueFull: 429,
}


class HttpError(EaselError):
    """An EaselError with its own HTTP status, e.g. a body over the size limit (413)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def describe_errors(errors: Any) -> str:
    """Pydantic's errors in one line, naming each field: `steps: Input should be a valid integer`."""
    parts = []
    for item in list(errors)[:5]:
        field = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body", "query", "header",
                                                                                   "path"))
        message = item.get("msg", "is not valid")
        if item.get("type") == "extra_forbidden":
            message = "unknown field (see /openapi.json)"
        elif item.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        parts.append(f"{field or 'body'}: {message}")
    return "; ".join(parts) or "the request is not valid"


# An error body in one API's dialect, from the status, Easel's error code and the message.
ErrorBody = Callable[[int, str, str], dict[str, Any]]


def easel_body(_status: int, code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


_DIALECTS: dict[str, ErrorBody] = {}  # path prefix -> how errors under it are written


def register_dialect(path_prefix: str, body: ErrorBody) -> None:
    """Errors of requests under `path_prefix` are written by `body` (e.g. OpenAI's `{"error": {...}}`)."""
    _DIALECTS[path_prefix] = body


def error_response(request: Request, status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The one place an error becomes a response, in the dialect of the route that was asked."""
    path = request.url.path
    body = next((make for prefix, make in _DIALECTS.items() if path.startswith(prefix)), easel_body)
    return JSONResponse(body(status, code, message), status, headers=headers)


async def easel_error(request: Request, error: EaselError) -> JSONResponse:
    status = error.status if isinstance(error, HttpError) else next(
        (code for cls, code in STATUS_OF.items() if isinstance(error, cls)), 400)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if isinstance(error, QuotaExceeded) and error.retry_after_s is not None:
        headers.update(retry_after_headers(error.retry_after_s))
    return error_response(request, status, error.code, error.message, headers)


def retry_after_headers(seconds: float) -> dict[str, str]:
    """`Retry-After` in whole seconds. A wait over a minute also says `x-should-retry: false`: the
    openai SDK (and other Stainless-made SDKs) would otherwise retry at once, twice, in vain, since
    they honour Retry-After only up to 60 s."""
    wait = max(1, math.ceil(seconds))
    return {"Retry-After": str(wait), **({"x-should-retry": "false"} if wait > 60 else {})}


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(request, 422, InvalidCommand.code, describe_errors(error.errors()))


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # 400 here is a malformed multipart body (too many files or fields, a broken boundary).
    code = {400: InvalidCommand.code, 404: NotFound.code, 405: "method_not_allowed"}.get(error.status_code,
                                                                                          "http_error")
    return error_response(request, error.status_code, code, str(error.detail), getattr(error, "headers", None))


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("HTTP request failed", exc_info=error)
    return error_response(request, 500, "internal_error", "Something went wrong on our side; it has "
                          "been logged. Try again.")


# For `FastAPI(exception_handlers=...)`: every error, whichever layer raised it, becomes the same JSON.
EXCEPTION_HANDLERS: dict[int | type[Exception], Callable[[Request, Any], Awaitable[Response]]] = {
    EaselError: easel_error, RequestValidationError: invalid_request, StarletteHTTPException: http_error,
    Exception: internal_error,
}
