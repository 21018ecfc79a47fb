"""fp16 variants: real float16 graphs in the manifest, measured against fp32, served and verified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from app.bundle import load_bundle_manifest


@pytest.fixture(scope="module")
def fp16_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.export import export_bundle

    out = tmp_path_factory.mktemp("fp16") / "tiny-fp16"
    export_bundle(tiny_run, out, progress=False, fp16=True)
    return out


def test_fp16_variant_is_listed_hashed_float16_inside_and_float32_at_its_edges(fp16_bundle: Path) -> None:
    manifest = load_bundle_manifest(fp16_bundle)  # checks every sha256, fp16 files included
    assert manifest.precisions() == ["fp32", "fp16"]
    for role, spec in manifest.graphs.items():
        fp16 = spec.variants["fp16"]
        assert fp16.file == f"{role}.fp16.onnx"
        model = onnx.load(str(fp16_bundle / fp16.file))
        onnx.checker.check_model(model, full_check=True)
        weights = [t for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
        halves = [t for t in weights if t.data_type == TensorProto.FLOAT16]
        assert len(halves) > len(weights) / 2, role  # really converted, not a copy of fp32
        fp32 = onnx.load(str(fp16_bundle / spec.variants["fp32"].file))
        same_interface = [(i.name, i.type.tensor_type.elem_type) for i in fp32.graph.input]
        assert [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input] == same_interface
        assert [o.name for o in model.graph.output] == [o.name for o in fp32.graph.output]
        assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in model.graph.output)


def test_fp16_quality_is_measured_on_real_test_samples_and_recorded(fp16_bundle: Path) -> None:
    quality = load_bundle_manifest(fp16_bundle).quality["fp16"]
    assert quality.samples > 0
    assert quality.top1_agreement is not None and quality.top1_agreement >= 0.98
    assert quality.min_embedding_cosine is not None and quality.min_embedding_cosine > 0.99
    assert quality.accuracy is not None and abs(quality.accuracy_drop or 0.0) <= 0.02


def test_server_on_cpu_keeps_fp32_under_auto_and_serves_fp16_when_asked(fp16_bundle: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    embeddings = {}
    for precision in ("auto", "fp16"):
        settings = Settings(bundle=fp16_bundle, index_path=tmp_path / precision, precision=precision,
                            intra_op_threads=1, decode_threads=1)
        with TestClient(create_app(settings)) as client:
            body = client.get("/v1/model").json()
            assert body["precision"] == ("fp32" if precision == "auto" else "fp16")
            r = client.post("/v1/embed", json={"text": "a small blue square"})
            assert r.status_code == 200, r.text
            embeddings[precision] = np.array(r.json()["text_embedding"])
    a, b = embeddings["auto"], embeddings["fp16"]
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99
    assert not np.array_equal(a, b)  # float16 really ran


def test_verify_checks_the_fp16_variant_against_its_recorded_agreement(fp16_bundle: Path, tiny_run: Path) -> None:
    from model.verify import verify_bundle

    report = verify_bundle(fp16_bundle, run_dir=tiny_run)
    assert report["ok"], report["failures"]
    assert report["variants"]["fp16"]["agreement_check"] == "ok"
