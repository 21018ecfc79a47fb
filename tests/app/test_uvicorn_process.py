"""A real uvicorn process, called over a socket: the way users run it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers.images import demo_png


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, index: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MMFUSION_BUNDLE": str(bundle), "MMFUSION_INDEX_PATH": str(index),
           "MMFUSION_INTRA_OP_THREADS": "1", **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read().decode() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become ready in 60 s")


def test_real_uvicorn_process_serves_classify_over_a_socket(tiny_bundle: Path, tiny_config, tmp_path: Path) -> None:
    proc, url = start_server(tiny_bundle, tmp_path / "index")
    try:
        r = httpx.post(f"{url}/v1/classify", files={"image": ("x.png", demo_png(tiny_config.demo_dir, 3), "image/png")},
                       data={"text": "how many shapes are there?"}, timeout=30)
        assert r.status_code == 200, r.text
        assert abs(sum(p["score"] for p in r.json()["predictions"]) - 1) < 1e-4
        assert r.headers["x-request-id"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    # uvicorn re-raises the captured SIGTERM after a graceful shutdown, so -15 is a clean exit.
    assert proc.returncode in (0, -15)
    assert b"Application shutdown complete" in out
