"""Faults the service must survive or refuse cleanly: SIGTERM with requests in flight, a damaged
index at start-up, a bundle with a corrupt ONNX graph, and requests that pass their deadline.

(SIGKILL during a stream of index writes is ``tests/app/test_index_crash.py``.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core import metrics
from app.core.errors import BundleError
from app.index import VectorIndex
from app.main import create_app
from benchmarks.common import free_port
from tests.app.test_uvicorn_process import start_server

LEAKS = ("Traceback", 'File "', "/work/", "/tmp/", ".py\"")


def raw_request_head(port: int, path: str, body_len: int) -> socket.socket:
    """Open a connection and send a request's headers only: the request is in flight, body pending."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {body_len}\r\n\r\n".encode())
    return sock


def refused_within(port: int, seconds: float) -> bool:
    """True once a new connection to ``port`` is refused (polled: signal handling takes a moment)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.05)
    return False


def read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


# --------------------------------------------------------------------------------------------------
# SIGTERM: drain, refuse, exit
# --------------------------------------------------------------------------------------------------


def test_sigterm_lets_in_flight_requests_complete_and_refuses_new_connections(tiny_bundle: Path, tmp_path: Path
                                                                              ) -> None:
    proc, url = start_server(tiny_bundle, tmp_path / "index")
    port = int(url.rsplit(":", 1)[1])
    bodies = [json.dumps({"text": f"a red circle number {i}"}).encode() for i in range(3)]
    try:
        # Three requests in flight: headers and half of each body sent, the rest still to come.
        socks = [raw_request_head(port, "/v1/embed", len(b)) for b in bodies]
        for sock, body in zip(socks, bodies, strict=True):
            sock.sendall(body[: len(body) // 2])
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        # The listener closes: a new client is refused at once (it can fail over), not queued.
        assert refused_within(port, 10.0), "new connections were still accepted after SIGTERM"
        assert proc.poll() is None, "the server exited with requests in flight"
        for sock, body in zip(socks, bodies, strict=True):
            sock.sendall(body[len(body) // 2:])
        for sock in socks:
            status, payload = read_response(sock)
            sock.close()
            assert status == 200, payload
            assert len(payload["text_embedding"]) == payload["dimension"]
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, -signal.SIGTERM)
    assert b"Application shutdown complete" in out


# --------------------------------------------------------------------------------------------------
# A damaged index at start-up
# --------------------------------------------------------------------------------------------------


def _index_with_items(settings: Any) -> list[Path]:
    from app.bundle.verify import load_bundle_manifest

    manifest = load_bundle_manifest(settings.bundle)
    index = VectorIndex.open(settings.index_path, bundle_name=manifest.name, bundle_version=manifest.version,
                             dim=manifest.embedding_dim)
    for i in range(20):
        vec = [float((i + j) % 7 + 1) for j in range(manifest.embedding_dim)]
        index.add(f"item-{i}", vec, text=f"item {i}", metadata={"n": i})
    index.compact()
    for i in range(20, 25):  # a WAL tail after the snapshot
        index.add(f"item-{i}", [1.0] * manifest.embedding_dim)
    index.close()
    return sorted(p for p in settings.index_path.iterdir() if p.is_file() and p.name != "LOCK")


@pytest.mark.parametrize("damage", ["truncate-half", "zero-bytes", "flip-middle-byte", "garbage"])
def test_a_damaged_index_file_leaves_the_index_unavailable_with_a_recovery_message_never_empty(
        settings: Any, damage: str) -> None:
    files = _index_with_items(settings)
    snapshots = [p for p in files if p.suffix not in (".json",) and p.stat().st_size > 64]
    assert snapshots, files
    target = max(snapshots, key=lambda p: p.stat().st_size)
    data = target.read_bytes()
    damaged = {"truncate-half": data[: len(data) // 2], "zero-bytes": b"",
               "flip-middle-byte": data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF])
               + data[len(data) // 2 + 1:],
               "garbage": b"\x00garbage" * 10}[damage]
    target.write_bytes(damaged)
    with TestClient(create_app(settings)) as c:
        for r in (c.post("/v1/search", json={"text": "item 3"}), c.get("/v1/index/items/item-3"),
                  c.post("/v1/index/items", json={"id": "new", "text": "x"})):
            assert r.status_code == 503, (damage, r.status_code, r.text)
            err = r.json()["error"]
            assert err["code"] == "index_unavailable"
            assert "corrupt" in err["message"] and "move the index directory aside" in err["message"]
            for marker in (*LEAKS, str(settings.index_path)):
                assert marker not in r.text, (marker, r.text)
        status = c.get("/v1/index").json()
        assert status["available"] is False and "rebuild" in status["message"]
        assert "mmfusion_index_available 0.0" in c.get("/metrics").text  # alerting can tell it from an empty index
        assert str(settings.index_path) not in json.dumps(status)
        # The model keeps serving; the index was not replaced by an empty one.
        assert c.post("/v1/embed", json={"text": "a red circle"}).status_code == 200
    assert target.read_bytes() == damaged


# --------------------------------------------------------------------------------------------------
# A corrupt ONNX graph in the bundle
# --------------------------------------------------------------------------------------------------


def _corrupt_copy(tiny_bundle: Path, dest: Path, *, rehash: bool) -> Path:
    bundle = dest / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    graph = bundle / "text_encoder.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[: len(data) // 3])
    if rehash:  # the manifest vouches for the damaged bytes: ONNX Runtime itself must refuse them
        manifest = (bundle / "manifest.json").read_text()
        old, new = hashlib.sha256(data).hexdigest(), hashlib.sha256(graph.read_bytes()).hexdigest()
        assert old in manifest
        (bundle / "manifest.json").write_text(manifest.replace(old, new))
    return bundle


@pytest.mark.parametrize("rehash", [False, True], ids=["hash-mismatch", "hash-updated"])
def test_a_bundle_with_a_corrupt_onnx_file_is_refused_with_a_message_naming_it(
        settings: Any, tiny_bundle: Path, tmp_path: Path, rehash: bool) -> None:
    bundle = _corrupt_copy(tiny_bundle, tmp_path, rehash=rehash)
    with pytest.raises(BundleError) as err, TestClient(create_app(settings.model_copy(update={"bundle": bundle}))):
        pass
    assert "text_encoder.onnx" in err.value.message
    assert ("sha256" in err.value.message) is not rehash
    assert ("ONNX Runtime cannot load" in err.value.message) is rehash


def test_a_real_server_with_a_corrupt_onnx_file_exits_non_zero_before_listening(tiny_bundle: Path,
                                                                                 tmp_path: Path) -> None:
    bundle = _corrupt_copy(tiny_bundle, tmp_path, rehash=True)
    port = free_port()
    env = {**os.environ, "MMFUSION_BUNDLE": str(bundle), "MMFUSION_INDEX_PATH": str(tmp_path / "index")}
    proc = subprocess.run([sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)], env=env,
                          capture_output=True, timeout=60)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert b"text_encoder.onnx" in out and b"ONNX Runtime cannot load" in out
    assert b"Uvicorn running" not in out


# --------------------------------------------------------------------------------------------------
# Per-request deadline
# --------------------------------------------------------------------------------------------------


def test_a_request_past_its_deadline_gets_504_and_its_queued_work_is_dropped(settings: Any) -> None:
    timed = settings.model_copy(update={"request_timeout_s": 0.3, "warmup": False, "text_cache_size": 0})
    with TestClient(create_app(timed)) as c:
        pipeline = c.app.state.service.pipeline  # type: ignore[attr-defined]
        real = pipeline.encode_text_rows
        encoded: list[str] = []
        release = threading.Event()

        def slow_encode(texts: list[str], **kw: Any) -> Any:
            encoded.extend(texts)
            if "stuck" in texts:
                release.wait(5)  # the graph call that blocks the text encoder's thread
            return real(texts, **kw)

        pipeline.encode_text_rows = slow_encode
        results: dict[str, Any] = {}

        def call(text: str) -> None:
            results[text] = c.post("/v1/embed", json={"text": text})

        first = threading.Thread(target=call, args=("stuck",))
        first.start()
        time.sleep(0.1)
        queued = [threading.Thread(target=call, args=(f"queued-{i}",)) for i in range(3)]
        t0 = time.perf_counter()
        for t in queued:
            t.start()
        for t in (first, *queued):
            t.join(10)
        elapsed = time.perf_counter() - t0
        for text in ("stuck", "queued-0", "queued-1", "queued-2"):
            r = results[text]
            assert r.status_code == 504, (text, r.text)
            assert r.json()["error"]["code"] == "timeout"
            assert "MMFUSION_REQUEST_TIMEOUT_S" in r.json()["error"]["message"]
            assert "may have completed" not in r.json()["error"]["message"]  # not a write
            assert r.headers["x-request-id"]
        assert elapsed < 3.0, elapsed  # answered at the deadline (0.3 s), not when the stuck call ends (5 s)
        release.set()
        time.sleep(0.3)
        ok = c.post("/v1/embed", json={"text": "after the timeouts"})
        assert ok.status_code == 200, ok.text
        # The cancelled requests never reached the graph: their slots were freed, not run later.
        assert not any(t.startswith("queued-") for t in encoded), encoded
        assert "after the timeouts" in encoded
        assert metrics.IN_FLIGHT._value.get() == 0  # type: ignore[attr-defined]


def test_an_index_write_past_its_deadline_says_it_may_have_been_applied(settings: Any) -> None:
    timed = settings.model_copy(update={"request_timeout_s": 0.3, "warmup": False})
    with TestClient(create_app(timed)) as c:
        assert c.post("/v1/index/items", json={"id": "a", "text": "a red circle"}).status_code == 201
        index = c.app.state.service.index  # type: ignore[attr-defined]
        real = index.delete

        def slow_delete(item_id: str) -> bool:
            time.sleep(0.6)  # a long compaction holding the writer, say
            return real(item_id)

        index.delete = slow_delete
        r = c.delete("/v1/index/items/a")
        assert r.status_code == 504
        assert "may have completed: read the item before retrying" in r.json()["error"]["message"]
        time.sleep(0.5)
        assert c.get("/v1/index/items/a").status_code == 404  # it was applied: the message was right


def test_requests_within_the_deadline_are_unaffected_and_zero_disables_it(settings: Any) -> None:
    for timeout_s in (5.0, 0.0):
        with TestClient(create_app(settings.model_copy(update={"request_timeout_s": timeout_s}))) as c:
            r = c.post("/v1/embed", json={"text": "a red circle"})
            assert r.status_code == 200, r.text
