"""The single place where errors become HTTP responses: one JSON schema, no stack traces.

Every error response, whatever raised it (a typed ``MMFusionError``, FastAPI's request validation,
Starlette's 404/405, the streaming body limit or an unexpected exception), has the body::

    {"error": {"code": "<stable machine-readable code>", "message": "<for humans>", "field": "<optional>"}}

Messages never contain exception text from libraries or tracebacks (they can carry file paths
and internals); unexpected exceptions are logged with the request id and answered with a fixed
500 message. ``app.api.middleware`` builds its raw ASGI error responses with :func:`error_body`.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.payload import validation_message
from app.core import metrics
from app.core.errors import MMFusionError

log = logging.getLogger("mmfusion.api")

HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 408: "request_timeout", 409: "conflict", 411: "length_required",
    413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_field", 429: "too_many_requests",
    500: "internal_error", 503: "unavailable", 504: "timeout",
}
INTERNAL_ERROR_MESSAGE = "internal server error; it was logged with this response's X-Request-ID"


def error_payload(code: str, message: str, field: str | None = None) -> dict[str, dict[str, str]]:
    body = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return {"error": body}


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    """The error schema as bytes, for middleware that answers at the ASGI level."""
    return json.dumps(error_payload(code, message, field)).encode()


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    metrics.ERRORS.labels(str(status), code).inc()
    return JSONResponse(error_payload(code, message, field), status_code=status, headers=headers)


def _field_of(loc: tuple[object, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MMFusionError)
    async def _mmfusion(_: Request, exc: MMFusionError) -> JSONResponse:
        if exc.status_code >= 500 and exc.status_code not in (503, 504, 507):
            # A typed server-side failure (e.g. BundleError): its message is for operators.
            log.error("%s: %s", exc.code, exc.message)
            return error_response(500, exc.code, INTERNAL_ERROR_MESSAGE)
        return error_response(exc.status_code, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _field_of(tuple(first.get("loc", ())))
        message = "; ".join(
            f"{_field_of(tuple(e.get('loc', ()))) or 'body'}: {validation_message(e)}" for e in errors[:5]
        )
        return error_response(422, "invalid_field", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) and status < 500 else HTTP_CODES.get(status, "error")
        path = request.url.path
        if status == 404 and len(path) > 1 and path.endswith("/"):
            detail = f"no route {path}; routes have no trailing slash (try {path.rstrip('/')})"
        return error_response(status, HTTP_CODES.get(status, "http_error"), detail,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Reached only for exceptions that escape every middleware (the request-id middleware
        # answers the ones raised inside it, with the request id in its log line).
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", INTERNAL_ERROR_MESSAGE)
