"""Load a bundle's manifest and refuse it unless every file is present and matches its sha256.

A model server that runs whatever bytes it finds is how model-archive exploits happen; we check
integrity before a single graph is handed to ONNX Runtime, and name the exact problem.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import ValidationError

from app.bundle.manifest import MANIFEST_FILE, BundleManifest
from app.core.errors import BundleError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _inside(root: Path, rel: str) -> Path:
    """Resolve ``rel`` under ``root`` and refuse paths that escape the bundle directory."""
    path = (root / rel).resolve()
    if root.resolve() not in path.parents and path != root.resolve():
        raise BundleError(f"bundle {root}: manifest path {rel!r} points outside the bundle directory")
    return path


def load_bundle_manifest(bundle_dir: Path | str, *, check_hashes: bool = True) -> BundleManifest:
    """Parse and validate ``manifest.json``; with ``check_hashes`` verify every listed file."""
    root = Path(bundle_dir)
    manifest_path = root / MANIFEST_FILE
    if not root.is_dir():
        hint = ("build it with `mmfusion build-default`" if root.name == "default"
                else "export one with `mmfusion export RUN --out DIR`, or point MMFUSION_BUNDLE at an existing one")
        raise BundleError(f"bundle directory {root} does not exist ({hint})")
    if not manifest_path.is_file():
        raise BundleError(f"bundle {root} has no {MANIFEST_FILE}")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle {root}: {MANIFEST_FILE} is not valid JSON ({exc})") from None
    try:
        manifest = BundleManifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:10]
        )
        raise BundleError(f"bundle {root}: invalid {MANIFEST_FILE}: {problems}") from None

    if manifest.seed_index is not None:
        _inside(root, manifest.seed_index)  # copied into the index directory at start-up: confined to the bundle
    labels_path = _inside(root, manifest.labels_file)
    if not labels_path.is_file():
        raise BundleError(f"bundle {root}: {manifest.labels_file}, named by {MANIFEST_FILE}, is missing")
    # One label per "\n"-terminated line, as the exporter writes it (not str.splitlines, which also
    # splits on U+2028, U+0085 and others that a label may contain); a "\r" left by an editor is dropped.
    lines = (line.removesuffix("\r") for line in labels_path.read_text(encoding="utf-8").split("\n"))
    on_disk = [line for line in lines if line]
    if on_disk != list(manifest.labels):
        raise BundleError(f"bundle {root}: {manifest.labels_file} disagrees with the labels in {MANIFEST_FILE}")

    if check_hashes:
        for rel, expected in manifest.files().items():
            path = _inside(root, rel)
            if not path.is_file():
                raise BundleError(f"bundle {root}: file {rel} listed in {MANIFEST_FILE} is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise BundleError(
                    f"bundle {root}: file {rel} fails its sha256 check (expected {expected[:12]}..., "
                    f"found {actual[:12]}...); the file was modified or truncated after export"
                )
    return manifest
