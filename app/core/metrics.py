"""Prometheus metrics, defined once for the process (``GET /metrics``).

Who records what:

* ``mmfusion_requests_total{method,route,status}`` and ``mmfusion_request_duration_seconds{method,route}``:
  one per HTTP request. ``route`` is the route template (``/v1/index/items/{item_id}``), never the raw
  path, so ids do not explode the label set; requests that matched no route are ``route="unmatched"``.
* ``mmfusion_errors_total{status,code}``: every error response, by its schema ``code`` (app.api.errors
  and the middleware's own 413/500 answers).
* ``mmfusion_inference_duration_seconds{graph}`` and ``mmfusion_batch_size{graph}``: one per ONNX Runtime
  graph call, ``graph`` in image_encoder / text_encoder / fusion_head; record both with
  :func:`observe_inference`.
* ``mmfusion_queue_depth{stage}``: work items submitted to a worker pool and not yet started
  (``stage`` = ``decode``, kept by :func:`run_in_pool`), or requests waiting in a graph's batching
  queue (``stage`` = the graph name, kept by ``app.inference.batcher.GraphBatcher``).
* ``mmfusion_queue_wait_seconds{graph}``: time from joining a graph's batching queue to the start of
  the batch that carried the request.
* ``mmfusion_rejected_total{graph,reason}``: requests refused with 503 ``overloaded`` because that
  graph's queue (or, ``graph="decode"``, the decode backlog) was full: ``reason`` = ``queue_full``
  (``MMFUSION_MAX_QUEUE_SIZE`` requests waiting) or ``queue_wait`` (more work queued than
  ``MMFUSION_MAX_QUEUE_WAIT_MS``), which tells an operator which of the two settings to look at;
  ``mmfusion_cancelled_total{graph}``: requests dropped from the queue unrun because
  their caller went away (client disconnect, request timeout).
* ``mmfusion_text_cache_total{result}``: text-encoder cache lookups, ``result`` = ``hit`` or ``miss``
  (one per text row); ``mmfusion_text_cache_entries``: rows held.
* ``mmfusion_in_flight_requests``, ``mmfusion_index_items``, ``mmfusion_ready``: gauges.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram

T = TypeVar("T")

# Up to 60 s: the default request deadline is 30 s, and requests answered 504 at it must land in a bucket
# of their own, not in +Inf with everything slower.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("mmfusion_requests_total", "HTTP requests", ["method", "route", "status"])
REQUEST_LATENCY = Histogram(
    "mmfusion_request_duration_seconds", "HTTP request latency", ["method", "route"], buckets=LATENCY_BUCKETS,
)
ERRORS = Counter("mmfusion_errors_total", "Error responses by status and error code", ["status", "code"])
INFERENCE_LATENCY = Histogram(
    "mmfusion_inference_duration_seconds", "ONNX Runtime time per graph call", ["graph"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
BATCH_SIZE = Histogram("mmfusion_batch_size", "Items per graph call", ["graph"], buckets=(1, 2, 4, 8, 16, 32, 64, 128))
QUEUE_WAIT = Histogram(
    "mmfusion_queue_wait_seconds", "Time a request waited in a graph's batching queue", ["graph"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REJECTED = Counter("mmfusion_rejected_total", "Requests refused because a batching queue was full",
                   ["graph", "reason"])
REJECT_REASONS = ("queue_full", "queue_wait")
CANCELLED = Counter("mmfusion_cancelled_total", "Queued requests dropped unrun (caller went away)", ["graph"])
BATCH_RETRIES = Counter("mmfusion_batch_retries_total",
                        "Merged batches that failed and were re-run one request at a time", ["graph"])
TEXT_CACHE = Counter("mmfusion_text_cache_total", "Text-encoder cache lookups per text row", ["result"])
TEXT_CACHE_ENTRIES = Gauge("mmfusion_text_cache_entries", "Text-encoder outputs held in the cache")
QUEUE_DEPTH = Gauge("mmfusion_queue_depth", "Work items waiting for a worker thread", ["stage"])
IN_FLIGHT = Gauge("mmfusion_in_flight_requests", "Requests being processed")
INDEX_ITEMS = Gauge("mmfusion_index_items", "Items in the vector index")
INDEX_AVAILABLE = Gauge(
    "mmfusion_index_available",
    "1 when the vector index is open; 0 when it could not be opened (search and /v1/index answer 503, see "
    "/v1/index for why): mmfusion_index_items alone reads 0 then, like an empty index")
READY = Gauge("mmfusion_ready", "1 once the model is loaded and warmed up")

GRAPHS = ("image_encoder", "text_encoder", "fusion_head")
STAGES = ("decode", *GRAPHS)
for _graph in GRAPHS:  # export the series at 0 before the first call, so dashboards see them
    INFERENCE_LATENCY.labels(_graph)
    BATCH_SIZE.labels(_graph)
    QUEUE_WAIT.labels(_graph)
    for _reason in REJECT_REASONS:
        REJECTED.labels(_graph, _reason)
    CANCELLED.labels(_graph)
    BATCH_RETRIES.labels(_graph)
for _result in ("hit", "miss"):
    TEXT_CACHE.labels(_result)
for _stage in STAGES:
    QUEUE_DEPTH.labels(_stage).set(0)
REJECTED.labels("decode", "queue_full")


def observe_inference(graph: str, batch_size: int, seconds: float) -> None:
    """Record one graph call: its wall time and how many items it carried."""
    INFERENCE_LATENCY.labels(graph).observe(seconds)
    BATCH_SIZE.labels(graph).observe(batch_size)


async def run_in_pool(pool: Executor, stage: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in ``pool`` from the event loop, counted in ``mmfusion_queue_depth{stage}`` while it waits.

    The caller's context variables (the request id for log lines) go with it: plain
    ``loop.run_in_executor`` does not copy them. An item cancelled before a worker took it (the
    client went away) leaves the queue count too.
    """
    gauge = QUEUE_DEPTH.labels(stage)
    ctx = contextvars.copy_context()

    def start() -> T:
        gauge.dec()
        return ctx.run(fn)

    gauge.inc()
    try:
        future: Future[T] = pool.submit(start)
    except BaseException:
        gauge.dec()
        raise
    future.add_done_callback(lambda f: gauge.dec() if f.cancelled() else None)
    return await asyncio.wrap_future(future)
