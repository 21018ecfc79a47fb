"""Prometheus metrics, defined once for the process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("mmfusion_requests_total", "HTTP requests", ["method", "route", "status"])
REQUEST_LATENCY = Histogram(
    "mmfusion_request_duration_seconds", "HTTP request latency", ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
INFERENCE_LATENCY = Histogram(
    "mmfusion_inference_duration_seconds", "ONNX Runtime time per graph call", ["graph"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
BATCH_SIZE = Histogram("mmfusion_batch_size", "Items per graph call", ["graph"], buckets=(1, 2, 4, 8, 16, 32, 64, 128))
IN_FLIGHT = Gauge("mmfusion_in_flight_requests", "Requests being processed")
INDEX_ITEMS = Gauge("mmfusion_index_items", "Items in the vector index")
READY = Gauge("mmfusion_ready", "1 once the model is loaded and warmed up")
