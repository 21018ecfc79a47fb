"""A real uvicorn process killed with SIGKILL right after acknowledged writes keeps every one of them.

The API acknowledges an index write only once it is fsynced to the write-ahead log, so nothing a
client saw succeed may be lost by the process dying without any shutdown (no lifespan, no
compaction, no flush).
"""

from __future__ import annotations

import base64
import signal
import subprocess
from pathlib import Path

import httpx

from tests.app.test_uvicorn_process import start_server
from tests.helpers.images import demo_png

ADMIN_KEY = "crash-test-admin-key-0123456789"
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
ENV = {"MMFUSION_ADMIN_KEYS": ADMIN_KEY, "MMFUSION_API_KEYS": "crash-test-read-key-0123456789"}


def kill_hard(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    if proc.stdout is not None:
        proc.stdout.close()


def test_acknowledged_writes_survive_sigkill(tiny_bundle: Path, tiny_config, tmp_path: Path) -> None:
    index = tmp_path / "index"
    png = base64.b64encode(demo_png(tiny_config.demo_dir, 4)).decode()
    acknowledged: dict[str, dict] = {}
    deleted: set[str] = set()

    proc, url = start_server(tiny_bundle, index, ENV)
    try:
        with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as c:
            for i in range(6):
                body = {"id": f"one-{i}", "text": f"a red circle number {i}", "metadata": {"round": 1, "i": i}}
                r = c.post("/v1/index/items", json=body)
                assert r.status_code == 201, r.text
                acknowledged[body["id"]] = body["metadata"]
            batch = [{"id": f"batch-{i}", "image_base64": png, "metadata": {"round": 1, "i": i}} for i in range(10)]
            r = c.post("/v1/index/items/batch", json={"items": batch})
            assert r.json()["added"] == 10, r.text
            acknowledged.update({b["id"]: b["metadata"] for b in batch})
            assert c.delete("/v1/index/items/one-0").status_code == 200
            deleted.add("one-0")
            r = c.post("/v1/index/items", json={"id": "last", "text": "the last write", "metadata": {"round": 1}})
            assert r.status_code == 201
            acknowledged["last"] = {"round": 1}
    finally:
        kill_hard(proc)  # immediately after the last acknowledgement, no graceful shutdown

    proc, url = start_server(tiny_bundle, index, ENV)
    try:
        with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as c:
            assert c.get("/v1/index").json()["count"] == len(acknowledged) - len(deleted)
            for item_id, metadata in acknowledged.items():
                r = c.get(f"/v1/index/items/{item_id}")
                if item_id in deleted:
                    assert r.status_code == 404
                else:
                    assert r.status_code == 200, (item_id, r.text)
                    assert r.json()["metadata"] == metadata
            # Second round: replace and add, kill again.
            r = c.post("/v1/index/items", json={"id": "one-1", "text": "replaced", "metadata": {"round": 2}})
            assert r.status_code == 200
            acknowledged["one-1"] = {"round": 2}
            for i in range(3):
                body = {"id": f"two-{i}", "text": "a blue square", "metadata": {"round": 2}}
                r = c.post("/v1/index/items", json=body)
                assert r.status_code == 201
                acknowledged[f"two-{i}"] = {"round": 2}
    finally:
        kill_hard(proc)

    proc, url = start_server(tiny_bundle, index, ENV)
    try:
        with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as c:
            assert c.get("/v1/index").json()["count"] == len(acknowledged) - len(deleted)
            for item_id, metadata in acknowledged.items():
                r = c.get(f"/v1/index/items/{item_id}")
                assert r.status_code == (404 if item_id in deleted else 200), item_id
                if item_id not in deleted:
                    assert r.json()["metadata"] == metadata
            assert c.get("/v1/index/items/one-1").json()["text"] == "replaced"
            hits = c.post("/v1/search", json={"text": "a blue square", "k": 5, "filter": {"round": 2}}).json()["hits"]
            assert {h["id"] for h in hits} == {"one-1", "two-0", "two-1", "two-2"}
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
