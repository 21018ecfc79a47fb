"""A real uvicorn process, called over a socket: the way users run it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx

from benchmarks.common import start_uvicorn
from tests.helpers.images import demo_png


def start_server(bundle: Path, index: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """The service on ``bundle`` with stdout and stderr merged into ``proc.stdout`` (tests read its logs)."""
    env = {**os.environ, "MMFUSION_BUNDLE": str(bundle), "MMFUSION_INDEX_PATH": str(index),
           "MMFUSION_INTRA_OP_THREADS": "1", **(extra_env or {})}
    return start_uvicorn(env)


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


def test_a_refused_start_up_is_one_log_line_not_a_traceback(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil
    import sys

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "labels.txt").unlink()
    env = {**os.environ, "MMFUSION_BUNDLE": str(bundle), "MMFUSION_INDEX_PATH": str(tmp_path / "index")}
    proc = subprocess.run([sys.executable, "-m", "uvicorn", "app.main:app", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3  # uvicorn's "startup failed"
    assert "cannot start: bundle " in proc.stderr and "labels.txt, named by manifest.json, is missing" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 6, proc.stderr
