"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure.

Bad input is always a 4xx that says what is wrong; only a bug in the server is a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.file import AdapterFormatError
from server.sequence import ContextLengthExceeded
from server.store import AdapterNotFound, InvalidAdapterId, StorageQuotaExceeded, StoreFull, StoreUnavailable
from server.tenancy.limiter import NeverAdmitted, RateLimited
from server.tenancy.service import TenancyError

log = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "invalid_request_error",
         409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "server_error", 507: "server_error"}


class APIError(Exception):
    """An error the API answers as-is: status, message, and the OpenAI `param` and `code` fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


CODES = {400: "invalid_request", 401: "invalid_api_key", 403: "insufficient_permissions", 404: "not_found",
         405: "method_not_allowed", 408: "request_timeout", 409: "conflict", 413: "payload_too_large",
         429: "rate_limit_exceeded", 500: "internal_error", 503: "service_unavailable", 507: "insufficient_storage"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object; `code` is never null (a status's generic code when none is more precise)."""
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code or CODES.get(status, "error")}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def as_api_error(exc: Exception) -> APIError:
    """Map the exceptions of the store, the adapter parser and the engine to API errors."""
    from server.engine import GenerationFailed, QueueFull  # the engine imports torch; errors.py stays light

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterNotFound):
        return APIError(404, str(exc), param="adapter_id", code="adapter_not_found")
    if isinstance(exc, InvalidAdapterId):
        return APIError(400, str(exc), param="adapter_id", code="invalid_adapter_id")
    if isinstance(exc, AdapterFormatError):
        return APIError(400, f"invalid adapter: {exc}", code="invalid_adapter")
    if isinstance(exc, StoreFull):
        return APIError(507, str(exc), code="insufficient_storage")
    if isinstance(exc, StoreUnavailable):
        return APIError(503, str(exc), code="store_unavailable", headers={"Retry-After": "2"})
    if isinstance(exc, StorageQuotaExceeded):
        return APIError(403, str(exc), param=exc.param, code="quota_exceeded")
    if isinstance(exc, RateLimited):
        return APIError(429, str(exc), code="rate_limit_exceeded", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, NeverAdmitted):
        return APIError(400, str(exc), code="request_too_large")
    if isinstance(exc, TenancyError):
        return APIError(exc.status, str(exc), code=exc.code)
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc) or "the request queue is full; retry later", code="queue_full")
    if isinstance(exc, GenerationFailed):
        return APIError(500, f"generation failed: {exc}", code="generation_failed")
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_request")
    raise exc


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    # drop the body/query root and pydantic's union-branch tags ("function-after[...]", "list[int]")
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path") and "[" not in str(p)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", code="internal_error")
