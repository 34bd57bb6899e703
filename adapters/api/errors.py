"""One error hook for the API: every failure answers `{"code": ..., "message": ...}`, never a bare 500."""

from __future__ import annotations

import logging
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


async def easel_error(_request: Request, error: EaselError) -> JSONResponse:
    status = error.status if isinstance(error, HttpError) else next(
        (code for cls, code in STATUS_OF.items() if isinstance(error, cls)), 400)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"code": error.code, "message": error.message}, status, headers=headers)


async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
    return JSONResponse({"code": InvalidCommand.code, "message": describe_errors(error.errors())}, 422)


async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
    # 400 here is a malformed multipart body (too many files or fields, a broken boundary).
    code = {400: InvalidCommand.code, 404: NotFound.code, 405: "method_not_allowed"}.get(error.status_code,
                                                                                          "http_error")
    return JSONResponse({"code": code, "message": str(error.detail)}, error.status_code,
                        headers=getattr(error, "headers", None))


async def internal_error(_request: Request, error: Exception) -> JSONResponse:
    log.exception("HTTP request failed", exc_info=error)
    return JSONResponse({"code": "internal_error", "message": "Something went wrong on our side; it has "
                         "been logged. Try again."}, 500)


# For `FastAPI(exception_handlers=...)`: every error, whichever layer raised it, becomes the same JSON.
EXCEPTION_HANDLERS: dict[int | type[Exception], Callable[[Request, Any], Awaitable[Response]]] = {
    EaselError: easel_error, RequestValidationError: invalid_request, StarletteHTTPException: http_error,
    Exception: internal_error,
}
