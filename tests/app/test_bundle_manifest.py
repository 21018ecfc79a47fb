"""The server refuses bundles that are invalid or were modified after export."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.bundle import BundleManifest, load_bundle_manifest
from app.core.errors import BundleError
from tests.helpers.bundles import edit_manifest as _edit_manifest


def test_exported_manifest_validates_and_lists_every_graph(tiny_bundle: Path) -> None:
    manifest = load_bundle_manifest(tiny_bundle)
    assert isinstance(manifest, BundleManifest)
    assert set(manifest.graphs) == {"image_encoder", "text_encoder", "fusion_head"}
    assert manifest.graphs["text_encoder"].input_names() == ["input_ids", "attention_mask"]
    assert manifest.graphs["image_encoder"].inputs[0].shape[0] == "batch"
    assert manifest.graphs["text_encoder"].inputs[0].shape == ["batch", "sequence"]
    assert manifest.labels == (tiny_bundle / "labels.txt").read_text().split()
    assert manifest.parity.max_abs_prob_diff <= 1e-4


def test_tampered_graph_file_is_refused_with_its_name(bundle_copy: Path) -> None:
    with (bundle_copy / "fusion_head.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"fusion_head\.onnx fails its sha256"):
        load_bundle_manifest(bundle_copy)


def test_tampered_tokenizer_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match=r"tokenizer\.json fails its sha256"):
        load_bundle_manifest(bundle_copy)


def test_missing_graph_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "image_encoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"image_encoder\.onnx listed in manifest\.json is missing"):
        load_bundle_manifest(bundle_copy)


def test_manifest_missing_a_field_names_the_field(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d.pop("embedding_dim"))
    with pytest.raises(BundleError, match="embedding_dim"):
        load_bundle_manifest(bundle_copy)


def test_manifest_with_unknown_schema_version_is_refused(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d.update(schema_version=99))
    with pytest.raises(BundleError, match="schema_version"):
        load_bundle_manifest(bundle_copy)


def test_manifest_path_escaping_the_bundle_is_refused(bundle_copy: Path) -> None:
    _edit_manifest(
        bundle_copy, lambda d: d["graphs"]["fusion_head"]["variants"]["fp32"].update(file="../../etc/passwd")
    )
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle_manifest(bundle_copy)


def test_manifest_that_is_not_json_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle_manifest(bundle_copy)


def test_server_refuses_to_start_on_a_tampered_bundle(bundle_copy: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    with (bundle_copy / "text_encoder.onnx").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"XXXX")
    app = create_app(Settings(bundle=bundle_copy, index_path=tmp_path / "idx"))
    with pytest.raises(BundleError, match=r"text_encoder\.onnx fails its sha256"), TestClient(app):
        pass


def test_a_seed_index_outside_the_bundle_is_refused(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda m: m.update(seed_index="../../../etc"))
    with pytest.raises(BundleError, match="points outside the bundle directory"):
        load_bundle_manifest(bundle_copy)
