"""JSON log lines carrying the request id, so one request can be followed across log lines.

Every line is one JSON object: ``ts``, ``level``, ``logger``, ``msg``, ``request_id`` (``-`` outside a
request) and, on the access line that ``app.api.middleware.RequestIdMiddleware`` writes once per
request (logger ``mmfusion.access``), ``method``, ``path``, ``route``, ``status``, ``duration_ms``,
``client``, ``bytes_sent`` and ``user_agent``. uvicorn's own loggers go through the same formatter; its
plain-text access log is turned off because the access line above replaces it (and carries the
request id and duration). An exception that escapes a thread is logged the same way (``threading.excepthook``),
not printed as a bare traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from contextvars import ContextVar

# Set by the request-id middleware for the duration of a request; read by every log line.
request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

ACCESS_FIELDS = ("method", "path", "route", "status", "duration_ms", "client", "bytes_sent", "user_agent")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for key in ACCESS_FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for the service's loggers and uvicorn's; idempotent."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("mmfusion", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
    logging.getLogger("mmfusion").setLevel(level.upper())
    threading.excepthook = _log_thread_exception
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False
    access.disabled = True
    # python_multipart logs every malformed body a client sends as a warning; the request's own
    # 400 response and access line already record it.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("mmfusion.thread").error(
        "uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

