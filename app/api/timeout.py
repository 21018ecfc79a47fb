"""Per-request deadline (``MMFUSION_REQUEST_TIMEOUT_S``): 504 in the error schema, and the work is cancelled.

Why a deadline at all: a client that gave up still holds a slot (a decode thread, a place in a
batching queue, a connection) until the server notices; without a bound, slow uploads or a stuck
graph turn into an unbounded pile of abandoned work. When the deadline passes, the request's task is
cancelled: a request still waiting in a batching queue is dropped from it (``app.inference.batcher``
discards cancelled entries, so its slot frees at once), awaiting code stops at its next ``await``,
and the client gets ``504 {"error": {"code": "timeout", ...}}``. Work already handed to a thread (a
decode in progress, a graph call already running for a whole batch) cannot be interrupted by Python;
it finishes and its result is thrown away.

The deadline covers the whole request from the moment its headers are parsed, body upload included (a
slow-loris *body* is cut off too). A client that trickles its *headers*, or opens a connection and sends
nothing, is uvicorn's to time out, and uvicorn has no header timeout: run the service behind a proxy that
has one (nginx ``client_header_timeout``, every cloud load balancer), as README's Security section says.
Once the response has started it can no longer be replaced, so the deadline then closes the
connection instead (logged). ``0`` disables it.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.middleware import TrackedSend, send_error

log = logging.getLogger("mmfusion.api")

TIMEOUT_CODE = "timeout"


class TimeoutMiddleware:
    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.timeout_s <= 0:
            await self.app(scope, receive, send)
            return
        tracked = TrackedSend(send)
        deadline = asyncio.timeout(self.timeout_s)
        try:
            async with deadline:
                await self.app(scope, receive, tracked)
        except TimeoutError:
            if not deadline.expired():  # the app's own TimeoutError, not this deadline: a server fault
                raise
            if tracked.started:
                log.error("request %s %s passed its %.3g s deadline while its response was being sent",
                          scope.get("method"), scope.get("path"), self.timeout_s)
                raise
            log.warning("request %s %s cancelled after its %.3g s deadline (MMFUSION_REQUEST_TIMEOUT_S)",
                        scope.get("method"), scope.get("path"), self.timeout_s)
            writes = scope.get("method") in ("POST", "PUT", "PATCH", "DELETE") and "/v1/index/" in scope.get("path", "")
            if not writes:
                outcome = "it was cancelled"
            else:
                # An index write already handed to its worker thread runs to the end (a thread cannot be
                # interrupted, and a half-applied write would be worse): its effect may be there.
                outcome = ("it was cancelled, but a write already under way may have completed: read the item "
                           "before retrying (adds and deletes by id are safe to repeat)")
            await send_error(send, 504, TIMEOUT_CODE,
                             f"the request did not complete within {self.timeout_s:g} s "
                             f"(MMFUSION_REQUEST_TIMEOUT_S); {outcome}")
