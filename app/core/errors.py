"""Every error the service can report, defined once.

Errors are values with a stable machine-readable ``code``, an HTTP status and a human message;
``app.api.errors`` maps them to the single JSON error schema in one place. Anything a client
sent that we refuse must be one of these, never a bare exception (which would become a 500).
"""

from __future__ import annotations


class MMFusionError(Exception):
    """Base of all expected errors. ``field`` names the offending request field when there is one."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}

    def __str__(self) -> str:
        return self.message


class BadRequestError(MMFusionError):
    status_code = 400
    code = "bad_request"


class UnauthorizedError(MMFusionError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str = "missing or invalid API key", **kw: object):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ForbiddenError(MMFusionError):
    status_code = 403
    code = "forbidden"


class NotFoundError(MMFusionError):
    status_code = 404
    code = "not_found"


class PayloadTooLargeError(MMFusionError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(MMFusionError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidFieldError(MMFusionError):
    status_code = 422
    code = "invalid_field"


class OverloadedError(MMFusionError):
    status_code = 503
    code = "overloaded"

    def __init__(self, message: str = "server is at capacity, retry shortly", retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class NotReadyError(MMFusionError):
    status_code = 503
    code = "not_ready"

    def __init__(self, message: str = "model is still loading", retry_after_s: int = 2):
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class NotAliveError(MMFusionError):
    """The process cannot recover by itself (an inference thread died): /livez fails so it is replaced."""

    status_code = 503
    code = "not_alive"


class RequestTimeoutError(MMFusionError):
    status_code = 504
    code = "timeout"


class BundleError(MMFusionError):
    """A bundle that cannot be trusted. Raised at start-up, so the service refuses to run it."""

    status_code = 500
    code = "bundle_invalid"
