"""Tampering with a copy of a bundle, for the tests that check what a server refuses."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def edit_manifest(bundle: Path, edit: Callable[[dict[str, Any]], object], *, sync_labels_file: bool = False
                  ) -> dict[str, Any]:
    """Apply ``edit`` to ``manifest.json`` in place; ``sync_labels_file`` rewrites labels.txt to match, as
    someone who edits the labels on purpose would (so only the manifest-vs-graph check can catch it)."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    if sync_labels_file:
        (bundle / data["labels_file"]).write_text("\n".join(data["labels"]) + "\n", encoding="utf-8")
    return data
