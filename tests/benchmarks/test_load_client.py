"""benchmarks/load_client.py against a real uvicorn process: bodies, keep-alive, chunking, reconnects, 4xx.

The server is the small FastAPI app below, run by ``python -m uvicorn`` from this file's folder
(one process for the module, ~1 s to start) with a 1 s keep-alive timeout so the idle-close case
takes a second, not five. Each echo answer names the client port the server saw, which tells
whether two requests shared one connection.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from benchmarks.common import REPO_ROOT, free_port
from benchmarks.load_client import HttpConnection, LoadClient, prepare_request

app = FastAPI()
CHUNKS = [b"first chunk\n", b"", b"x" * 70_000, bytes(range(256)), b"last"]


@app.post("/echo")
async def echo(request: Request) -> Response:
    body = await request.body()
    port = request.client.port if request.client else 0
    return Response(body, media_type="application/octet-stream",
                    headers={"x-client-port": str(port), "x-content-type": request.headers.get("content-type", "")})


@app.get("/stream")
async def stream() -> StreamingResponse:
    async def parts() -> AsyncIterator[bytes]:
        for chunk in CHUNKS:
            yield chunk
            await asyncio.sleep(0)

    return StreamingResponse(parts(), media_type="application/octet-stream")


@app.get("/close")
async def close(request: Request) -> Response:
    port = request.client.port if request.client else 0
    return Response(b"bye", headers={"connection": "close", "x-client-port": str(port)})


@app.get("/status/{code}")
async def status(code: int) -> Response:
    return Response(b"" if code == 204 else f"status {code}".encode(), status_code=code)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "test_load_client:app", "--app-dir", str(Path(__file__).parent),
         "--host", "127.0.0.1", "--port", str(port), "--timeout-keep-alive", "1", "--log-level", "warning"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/status/200", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "test server did not start"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_prepared_request_has_host_length_keep_alive_and_the_body():
    raw = prepare_request("127.0.0.1", 8000, "post", "/v1/x", b"abc",
                          {"Content-Type": "text/plain", "Content-Length": "999", "Host": "evil"})
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/x HTTP/1.1" and body == b"abc"
    assert set(lines[1:]) == {"host: 127.0.0.1:8000", "content-length: 3", "connection: keep-alive",
                              "content-type: text/plain"}


def test_binary_bodies_come_back_byte_for_byte_on_one_reused_connection(server: str):
    async def go() -> None:
        async with LoadClient(server, connections=1, timeout_s=10) as client:
            ports = set()
            for size in (0, 1, 1000, 300_000):
                payload = bytes((i * 7 + size) % 256 for i in range(size))
                r = await client.send(client.prepare("POST", "/echo", payload, {"content-type": "x/y"}))
                assert r.status == 200 and r.body == payload
                assert r.headers["content-length"] == str(size) and r.headers["x-content-type"] == "x/y"
                ports.add(r.headers["x-client-port"])
            assert len(ports) == 1 and client.opened == 1  # keep-alive: one connection for all four

    asyncio.run(go())


def test_concurrent_clients_each_keep_their_own_connection(server: str):
    async def go() -> None:
        async with LoadClient(server, connections=3, timeout_s=10) as client:
            raw = client.prepare("POST", "/echo", b"hello")

            async def one_client() -> set[str]:
                seen = set()
                for _ in range(5):
                    r = await client.send(raw)
                    assert r.status == 200 and r.body == b"hello"
                    seen.add(r.headers["x-client-port"])
                return seen

            results = await asyncio.gather(*(one_client() for _ in range(3)))
            ports = set().union(*results)
            assert client.opened == 3 and len(ports) == 3

    asyncio.run(go())


def test_chunked_response_is_reassembled_and_the_connection_stays_usable(server: str):
    async def go() -> None:
        async with LoadClient(server, connections=1, timeout_s=10) as client:
            raw = client.prepare("GET", "/stream")
            for _ in range(2):
                r = await client.send(raw)
                assert r.status == 200 and r.headers["transfer-encoding"] == "chunked"
                assert "content-length" not in r.headers
                assert r.body == b"".join(CHUNKS)
            r = await client.send(client.prepare("POST", "/echo", b"after"))
            assert r.body == b"after" and client.opened == 1  # the chunked bodies were read to their exact end

    asyncio.run(go())


def test_connection_close_from_the_server_makes_the_next_request_reconnect(server: str):
    async def go() -> None:
        url = urlsplit(server)
        conn = HttpConnection(url.hostname or "", url.port or 80)
        r1 = await conn.request(prepare_request(conn.host, conn.port, "GET", "/close"))
        assert r1.status == 200 and r1.body == b"bye" and r1.headers["connection"] == "close"
        assert not conn.connected
        r2 = await conn.request(prepare_request(conn.host, conn.port, "POST", "/echo", b"again"))
        assert r2.status == 200 and r2.body == b"again" and conn.opened == 2
        assert r2.headers["x-client-port"] != r1.headers["x-client-port"]
        await conn.close()

    asyncio.run(go())


def test_a_connection_the_server_closed_while_idle_is_reopened_and_the_request_sent_again(server: str):
    async def go() -> None:
        async with LoadClient(server, connections=1, timeout_s=10) as client:
            raw = client.prepare("POST", "/echo", b"ping")
            first = await client.send(raw)
            await asyncio.sleep(1.6)  # past the server's 1 s keep-alive timeout: it closes the socket
            second = await client.send(raw)
            assert first.status == second.status == 200 and second.body == b"ping"
            assert client.opened == 2 and second.headers["x-client-port"] != first.headers["x-client-port"]

    asyncio.run(go())


def test_client_and_server_errors_are_statuses_not_exceptions(server: str):
    async def go() -> None:
        async with LoadClient(server, connections=1, timeout_s=10) as client:
            missing = await client.send(client.prepare("GET", "/no/such/route"))
            assert missing.status == 404 and b"Not Found" in missing.body
            for code in (400, 422, 503):
                r = await client.send(client.prepare("GET", f"/status/{code}"))
                assert r.status == code and r.body == f"status {code}".encode()
            empty = await client.send(client.prepare("GET", "/status/204"))
            assert empty.status == 204 and empty.body == b""
            ok = await client.send(client.prepare("POST", "/echo", b"still alive"))
            assert ok.body == b"still alive" and client.opened == 1

    asyncio.run(go())


def test_a_refused_connection_raises_a_transport_error():
    async def go() -> None:
        client = LoadClient(f"http://127.0.0.1:{free_port()}", connections=1, timeout_s=5)
        with pytest.raises(ConnectionError):
            await client.send(client.prepare("GET", "/"))

    asyncio.run(go())
