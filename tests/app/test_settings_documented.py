"""Docs match the code: every setting is in README's table, and the Docker image sets only real ones."""

from __future__ import annotations

import re
from pathlib import Path

from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [f"MMFUSION_{name.upper()}" for name in Settings.model_fields if f"MMFUSION_{name.upper()}" not in readme]
    assert missing == []


def test_the_docker_image_sets_only_settings_that_exist() -> None:
    names = set(re.findall(r"\bMMFUSION_([A-Z0-9_]+)=", (ROOT / "Dockerfile").read_text()))
    assert names, "the Dockerfile sets no MMFUSION_ variable at all"
    assert {n.lower() for n in names} <= set(Settings.model_fields)
