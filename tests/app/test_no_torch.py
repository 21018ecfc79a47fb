"""Serving never imports torch, even though the dev environment has it installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_serving_app_runs_a_request_without_importing_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    code = f"""
import sys
from fastapi.testclient import TestClient
from app.core.config import Settings
from app.main import create_app
with TestClient(create_app(Settings(bundle={str(tiny_bundle)!r}, index_path={str(tmp_path / 'i')!r}))) as c:
    assert c.post('/v1/embed', json={{'text': 'a red circle'}}).status_code == 200
assert 'torch' not in sys.modules, 'torch was imported by the serving path'
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
