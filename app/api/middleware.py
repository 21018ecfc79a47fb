"""ASGI middleware: a streaming request-size limit, and the outermost request wrapper.

``BodyLimitMiddleware`` counts body bytes as they arrive and stops reading at the limit, so a
10 GB upload costs at most ``max_bytes`` (plus one chunk) of memory, never the whole body; a
declared ``Content-Length`` over the limit is refused before a single body byte is read.

``RequestIdMiddleware`` is the outermost wrapper (``app.main`` adds it last). Per request it:

* takes ``X-Request-ID`` if sane (1-128 of ``[A-Za-z0-9-_.:]``) or makes one, echoes it back and
  puts it in every log line (``app.core.logging.request_id_var``);
* writes one access log line (logger ``mmfusion.access``: method, path, route, status, duration_ms);
* answers an exception that escaped the app with the error schema and a fixed message (500), after
  logging it with the request id: Starlette's own last-resort handler runs outside this middleware,
  where the request id is already gone and the response would lack the ``X-Request-ID`` header;
* adds ``X-Content-Type-Options: nosniff`` to every response, and to HTML responses (``/docs``,
  ``/redoc``) a Content-Security-Policy allowing only this origin: the docs must work offline, and
  the browser then never contacts another host even where a bundled asset names one (ReDoc's
  sidebar logo is loaded from cdn.redoc.ly);
* optionally (``record_metrics=True``) records the request metrics, seeing the final status of
  every request, including the 413s that ``BodyLimitMiddleware`` answers itself.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
import weakref
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import INTERNAL_ERROR_MESSAGE, error_body
from app.core import metrics
from app.core.errors import MMFusionError
from app.core.logging import request_id_var

__all__ = ["DOCS_CSP", "BodyLimitMiddleware", "RequestIdMiddleware", "StartupErrorMiddleware", "request_id_var"]

access_log = logging.getLogger("mmfusion.access")
log = logging.getLogger("mmfusion.api")

DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)
# Status logged (not sent) when the client went away before the response: nginx's convention.
CLIENT_CLOSED = 499


class _TooLarge(Exception):
    pass


async def send_error(send: Send, status: int, code: str, message: str, *, close: bool = False) -> None:
    """A complete error response at the ASGI level, in the one error schema."""
    body = error_body(code, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    metrics.ERRORS.labels(str(status), code).inc()
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    await send_error(send, 413, "payload_too_large",
                                     f"request body is {declared} bytes, over the limit of {limit} "
                                     "(MMFUSION_MAX_UPLOAD_BYTES)", close=True)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        tracked = TrackedSend(send)
        try:
            await self.app(scope, limited_receive, tracked)
        except _TooLarge:
            if tracked.started:
                raise
            await send_error(send, 413, "payload_too_large",
                             f"request body is over the limit of {limit} bytes (MMFUSION_MAX_UPLOAD_BYTES)",
                             close=True)


class TrackedSend:
    """``send`` that remembers whether the response has started: until then a middleware may still
    answer with its own JSON error; after that it can only let the failure propagate."""

    def __init__(self, send: Send):
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


# The access log keeps this much of a User-Agent (a client chooses its length).
_MAX_AGENT_CHARS = 200

_ROUTE_TEMPLATES: weakref.WeakKeyDictionary[Any, list[tuple[re.Pattern[str], str]]] = weakref.WeakKeyDictionary()


def _route_template(scope: Scope) -> str:
    """The route a request was for when routing never ran: a 413 from ``BodyLimitMiddleware`` or a 504
    answered before the body was read still counts under ``/v1/classify``, not under "unmatched".

    The templates come from the app's OpenAPI paths (public and cached by FastAPI), not from walking
    the router, whose nesting of included routers is private to each FastAPI version."""
    app = scope.get("app")
    if app is None or not callable(getattr(app, "openapi", None)):
        return "unmatched"
    compiled = _ROUTE_TEMPLATES.get(app)
    if compiled is None:
        try:
            paths = list(app.openapi().get("paths", {}))
        except Exception:  # the schema is for docs; metrics must not fail because of it
            paths = []
        compiled = _ROUTE_TEMPLATES[app] = [(compile_path(p)[0], p) for p in paths]
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):  # behind a proxy prefix (--root-path) the templates are relative to it
        path = path[len(root):] or "/"
    return next((template for regex, template in compiled if regex.match(path)), "unmatched")


def _valid_request_id(value: str) -> bool:
    return 0 < len(value) <= 128 and all(c.isascii() and (c.isalnum() or c in "-_.:") for c in value)


class StartupErrorMiddleware:
    """A start-up refused for a known reason (a bad bundle, an unusable index path) is one line in the log.

    Starlette sends ``lifespan.startup.failed`` with the whole formatted traceback, and uvicorn logs that
    message: 3-4 KB of framework frames around a line that already says what is wrong and how to fix it.
    For this project's own errors (``MMFusionError``) the message is replaced by that line; any other
    exception is a bug and keeps its traceback. The exception still propagates (uvicorn exits 3, and
    ``TestClient`` re-raises it).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_wrapped(message: Message) -> None:
            # Starlette sends the failure from inside its ``except`` block: the exception is the one handled.
            exc = sys.exc_info()[1]
            if message["type"] == "lifespan.startup.failed" and isinstance(exc, MMFusionError):
                message = {**message, "message": f"cannot start: {exc.message}"}
            await send(message)

        await self.app(scope, receive, send_wrapped)


class RequestIdMiddleware:
    """Request id, access log, last-resort error answer, security headers (see the module docstring)."""

    def __init__(self, app: ASGIApp, record_metrics: bool = False):
        self.app = app
        self.record_metrics = record_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid = ""
        agent = ""
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _valid_request_id(candidate):
                    rid = candidate
            elif name == b"user-agent":
                agent = value[:_MAX_AGENT_CHARS].decode("latin-1")
        rid = rid or uuid.uuid4().hex
        token = request_id_var.set(rid)
        status = 0
        sent = 0

        async def send_wrapped(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers += [(b"x-request-id", rid.encode()), (b"x-content-type-options", b"nosniff")]
                if any(k.lower() == b"content-type" and v.lower().startswith(b"text/html") for k, v in headers):
                    headers.append((b"content-security-policy", DOCS_CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        if self.record_metrics:
            metrics.IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_wrapped)
        except ClientDisconnect:
            status = status or CLIENT_CLOSED
        except Exception as exc:
            if status:  # the response had started: too late to answer; the server closes the connection
                log.error("error after the response started on %s %s", scope.get("method"), scope.get("path"),
                          exc_info=exc)
                raise
            log.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            await send_error(send_wrapped, 500, "internal_error", INTERNAL_ERROR_MESSAGE)
        finally:
            duration = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or _route_template(scope)
            method = scope.get("method", "-")
            final = status or 500
            # The client as uvicorn saw it: the peer, or with MMFUSION_FORWARDED_ALLOW_IPS trusting the proxy,
            # the address the proxy forwarded.
            client = scope.get("client")
            access_log.info("%s %s %s %.1fms", method, scope.get("path", ""), final, duration * 1000,
                            extra={"method": method, "path": scope.get("path", ""), "route": route,
                                   "status": final, "duration_ms": round(duration * 1000, 3),
                                   "client": f"{client[0]}:{client[1]}" if client else None,
                                   "bytes_sent": sent, "user_agent": agent or None})
            if self.record_metrics:
                metrics.IN_FLIGHT.dec()
                metrics.REQUESTS.labels(method, route, str(final)).inc()
                metrics.REQUEST_LATENCY.labels(method, route).observe(duration)
            request_id_var.reset(token)
