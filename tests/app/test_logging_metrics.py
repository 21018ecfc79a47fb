"""Operational signals: JSON log lines with the request id, one access line per request, and the
Prometheus metrics (requests by route and status, errors by code, queue depth, inference)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from app.core import metrics
from app.core.logging import JsonFormatter, configure_logging, request_id_var
from tests.app.test_uvicorn_process import start_server


class Collect(logging.Handler):
    """Formats records with the service's JSON formatter and keeps the parsed lines."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def logs() -> Iterator[Collect]:
    handler = Collect()
    logger = logging.getLogger("mmfusion")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def app_client(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, TestClient]]:
    from app.core.config import Settings
    from app.main import create_app

    settings = Settings(bundle=tiny_bundle, index_path=tmp_path_factory.mktemp("obs") / "index",
                        intra_op_threads=1, decode_threads=2)
    app = create_app(settings)

    @app.get("/test/log-inside")
    async def log_inside() -> dict:
        logging.getLogger("mmfusion.test").warning("inside the handler")
        return {"ok": True}

    @app.get("/test/crash")
    async def crash() -> None:
        raise ValueError("boom")

    with TestClient(app) as c:
        yield app, c


@pytest.fixture
def api(app_client: tuple[FastAPI, TestClient]) -> TestClient:
    return app_client[1]


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def access_lines(logs: Collect) -> list[dict]:
    return [line for line in logs.lines if line["logger"] == "mmfusion.access"]


# --------------------------------------------------------------------------------------------------
# Request id and log lines
# --------------------------------------------------------------------------------------------------


def test_a_sane_client_request_id_is_echoed_and_logged(api: TestClient, logs: Collect) -> None:
    r = api.get("/test/log-inside", headers={"X-Request-ID": "client-id_1.2:3"})
    assert r.headers["x-request-id"] == "client-id_1.2:3"
    inside = [line for line in logs.lines if line["msg"] == "inside the handler"]
    assert inside and inside[0]["request_id"] == "client-id_1.2:3"
    assert access_lines(logs)[-1]["request_id"] == "client-id_1.2:3"


@pytest.mark.parametrize("bad", ["", "x" * 129, "has space", "semi;colon", "ünïcode", "<script>"],
                         ids=["empty", "too-long", "space", "semicolon", "non-ascii", "markup"])
def test_an_unsafe_request_id_is_replaced_by_a_generated_one(api: TestClient, bad: str) -> None:
    r = api.get("/livez", headers={"X-Request-ID": bad.encode("utf-8")})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_generated_request_ids_differ_per_request(api: TestClient) -> None:
    ids = {api.get("/livez").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


def test_one_access_line_per_request_with_method_path_route_status_duration(api: TestClient, logs: Collect) -> None:
    api.get("/livez")
    api.post("/v1/classify", json={"text": "hi"})
    api.get("/v1/nope")
    lines = access_lines(logs)
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("GET", "/livez", 200), ("POST", "/v1/classify", 422), ("GET", "/v1/nope", 404)]
    assert [line["route"] for line in lines] == ["/livez", "/v1/classify", "unmatched"]
    for line in lines:
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert re.fullmatch(r"[0-9a-f]{32}", line["request_id"])
        assert line["level"] == "info" and line["ts"].endswith("Z")
        assert line["client"] and line["user_agent"].startswith("testclient") and line["bytes_sent"] > 0


def test_an_exception_escaping_a_thread_is_a_json_log_line(logs: Collect, monkeypatch) -> None:
    import threading

    from app.core import logging as service_logging

    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # restored after the test
    service_logging.configure_logging("info")  # installs the hook (and replaces the handlers: re-add ours)
    logging.getLogger("mmfusion").addHandler(logs)

    def boom() -> None:
        raise RuntimeError("escaped")

    t = threading.Thread(target=boom, name="worker-x")
    t.start()
    t.join()
    lines = [line for line in logs.lines if "worker-x" in line["msg"]]
    assert lines and lines[0]["logger"] == "mmfusion.thread" and "RuntimeError: escaped" in lines[0]["exc"]


def test_an_unexpected_error_is_logged_once_with_the_request_id_and_its_traceback(api: TestClient, logs: Collect
                                                                                 ) -> None:
    r = api.get("/test/crash", headers={"X-Request-ID": "crash-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "crash-1"
    assert "boom" not in r.text and "Traceback" not in r.text
    errors = [line for line in logs.lines if line["level"] == "error"]
    assert len(errors) == 1
    assert errors[0]["request_id"] == "crash-1" and "ValueError: boom" in errors[0]["exc"]
    assert access_lines(logs)[-1]["status"] == 500


def test_log_lines_outside_requests_have_a_dash_request_id(logs: Collect) -> None:
    logging.getLogger("mmfusion.test").warning("no request here")
    assert logs.lines[-1]["request_id"] == "-"


def test_configure_logging_routes_uvicorn_through_json_and_silences_its_access_log() -> None:
    configure_logging("info")
    for name in ("mmfusion", "uvicorn", "uvicorn.error"):
        handlers = logging.getLogger(name).handlers
        assert len(handlers) == 1 and isinstance(handlers[0].formatter, JsonFormatter), name
    assert logging.getLogger("uvicorn.access").disabled
    configure_logging("info")  # idempotent: still one handler
    assert len(logging.getLogger("mmfusion").handlers) == 1


def test_a_real_server_writes_json_lines_with_an_access_line(tiny_bundle: Path, tmp_path: Path) -> None:
    proc, url = start_server(tiny_bundle, tmp_path / "index")
    try:
        r = httpx.get(f"{url}/livez", headers={"X-Request-ID": "uvicorn-check"}, timeout=10)
        assert r.headers["x-request-id"] == "uvicorn-check"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    parsed = [json.loads(line) for line in lines]
    access = [p for p in parsed if p["logger"] == "mmfusion.access" and p["request_id"] == "uvicorn-check"]
    assert len(access) == 1 and access[0]["path"] == "/livez" and access[0]["status"] == 200
    assert any(p["logger"].startswith("uvicorn") for p in parsed)  # uvicorn's own lines are JSON too
    assert not any('"GET /livez HTTP/1.1" 200' in line for line in out.decode().splitlines())  # no plain access log


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def test_request_counts_by_route_template_and_status(api: TestClient) -> None:
    labels = {"method": "POST", "route": "/v1/classify", "status": "422"}
    before = sample("mmfusion_requests_total", labels)
    before_latency = sample("mmfusion_request_duration_seconds_count", {"method": "POST", "route": "/v1/classify"})
    for _ in range(3):
        api.post("/v1/classify", json={"text": "hi"})
    assert sample("mmfusion_requests_total", labels) == before + 3
    assert sample("mmfusion_request_duration_seconds_count", {"method": "POST", "route": "/v1/classify"}) \
        >= before_latency + 3
    text = api.get("/metrics").text
    assert 'mmfusion_requests_total{method="POST",route="/v1/classify",status="422"}' in text


def test_error_responses_are_counted_by_code(api: TestClient) -> None:
    labels = {"status": "415", "code": "unsupported_media_type"}
    before = sample("mmfusion_errors_total", labels)
    api.post("/v1/classify", content=b"x", headers={"content-type": "text/plain"})
    assert sample("mmfusion_errors_total", labels) == before + 1


def test_the_metric_families_are_exported(api: TestClient) -> None:
    text = api.get("/metrics").text
    for name in ("mmfusion_requests_total", "mmfusion_request_duration_seconds", "mmfusion_errors_total",
                 "mmfusion_inference_duration_seconds", "mmfusion_batch_size", "mmfusion_queue_depth",
                 "mmfusion_in_flight_requests", "mmfusion_index_items", "mmfusion_index_available", "mmfusion_ready"):
        assert f"# TYPE {name} " in text, name
    assert "mmfusion_index_available 1.0" in text
    assert 'mmfusion_queue_depth{stage="decode"}' in text
    assert 'mmfusion_inference_duration_seconds_count{graph="image_encoder"}' in text


def test_observe_inference_records_time_and_batch_size_per_graph() -> None:
    before = sample("mmfusion_batch_size_sum", {"graph": "text_encoder"})
    count = sample("mmfusion_inference_duration_seconds_count", {"graph": "text_encoder"})
    metrics.observe_inference("text_encoder", 8, 0.004)
    assert sample("mmfusion_batch_size_sum", {"graph": "text_encoder"}) == before + 8
    assert sample("mmfusion_inference_duration_seconds_count", {"graph": "text_encoder"}) == count + 1


def test_run_in_pool_counts_waiting_items_and_carries_the_request_id() -> None:
    gauge = {"stage": "decode"}
    release = threading.Event()
    seen: list[str] = []

    def work(i: int) -> int:
        release.wait(5)
        seen.append(request_id_var.get())
        return i

    async def main() -> list[int]:
        pool = ThreadPoolExecutor(1)
        token = request_id_var.set("rid-in-pool")
        try:
            tasks = [asyncio.create_task(metrics.run_in_pool(pool, "decode", lambda i=i: work(i))) for i in range(4)]
            deadline = time.monotonic() + 5
            while sample("mmfusion_queue_depth", gauge) != 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert sample("mmfusion_queue_depth", gauge) == 3  # one running, three waiting
            tasks[3].cancel()  # a client went away: its item never runs and leaves the queue
            await asyncio.sleep(0.05)
            assert sample("mmfusion_queue_depth", gauge) == 2
            release.set()
            done = await asyncio.gather(*tasks[:3])
            return done
        finally:
            request_id_var.reset(token)
            pool.shutdown()

    assert sample("mmfusion_queue_depth", gauge) == 0
    assert asyncio.run(main()) == [0, 1, 2]
    assert sample("mmfusion_queue_depth", gauge) == 0
    assert seen == ["rid-in-pool"] * 3


def test_outermost_middleware_with_metrics_counts_the_413_answered_by_the_body_limit(logs: Collect) -> None:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"n": len(await request.body())})

    inner = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    app = RequestIdMiddleware(BodyLimitMiddleware(inner, max_bytes=1024), record_metrics=True)
    labels = {"method": "POST", "route": "unmatched", "status": "413"}
    before = sample("mmfusion_requests_total", labels)
    with TestClient(app) as client:
        assert client.post("/echo", content=b"x" * 100).json() == {"n": 100}
        r = client.post("/echo", content=b"x" * 2000)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        assert r.headers["x-request-id"]
    assert sample("mmfusion_requests_total", labels) == before + 1
    assert [line["status"] for line in access_lines(logs)][-2:] == [200, 413]


def test_a_client_that_disconnects_mid_body_is_logged_as_499_without_an_error(app_client, logs: Collect) -> None:
    app, client = app_client
    sent: list[dict] = []
    messages = iter([{"type": "http.request", "body": b'{"text": "par', "more_body": True},
                     {"type": "http.disconnect"}])

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/classify", "raw_path": b"/v1/classify", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("testserver", 80)}
    client.portal.call(app, scope, receive, send)
    assert sent == []  # nobody is left to answer
    assert access_lines(logs)[-1]["status"] == 499
    assert not [line for line in logs.lines if line["level"] == "error"]


def test_a_timeout_raised_by_the_app_itself_is_a_500_not_the_deadline_504() -> None:
    from app.api.timeout import TimeoutMiddleware

    async def inner(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        if scope["path"] == "/own":
            raise TimeoutError("an upstream call of the app timed out")
        await asyncio.sleep(5)

    app = RequestIdMiddleware(TimeoutMiddleware(inner, timeout_s=0.2))
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: the raw app has none
    r = client.get("/own")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"  # not "the deadline passed"
    r = client.get("/slow")
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_start_up_passes_are_not_counted_as_inference_traffic(settings) -> None:
    from app.main import create_app

    def count() -> float:
        return sum(sample("mmfusion_inference_duration_seconds_count", {"graph": g})
                   for g in ("image_encoder", "text_encoder", "fusion_head"))

    before = count()
    with TestClient(create_app(settings.model_copy(update={"warmup": True}))) as c:
        assert count() == before  # probe and warm-up ran, and were left out
        c.post("/v1/embed", json={"text": "a red circle"})
        assert count() == before + 1
