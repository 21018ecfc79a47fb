"""A reduced pretrained default bundle (real encoders, few images, one epoch) exports and serves.

The full-quality default (`mmfusion build-default`, minutes) is measured by hand, not here: this
builds the same configuration on 40 images so CI proves the wiring end to end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from app.bundle import load_bundle_manifest
from app.preprocessing.image import preprocess_pil
from app.preprocessing.text import TextTokenizer
from model.default_bundle import build_default, default_config

REDUCED = {"demo_images": 40, "epochs": 1, "batch_size": 32, "num_threads": 2}


@pytest.fixture(scope="module")
def pretrained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("default") / "bundle"
    return build_default(out, progress=False, overrides=REDUCED, questions_per_image=2)


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_default_config_is_the_frozen_pretrained_cross_attention_model(tmp_path: Path) -> None:
    cfg = default_config(tmp_path / "bundle")
    assert (cfg.image_encoder, cfg.text_encoder, cfg.fusion) == ("efficientnet_lite0", "minilm", "cross_attention")
    assert cfg.encoder_kwargs["image"]["freeze"] and cfg.encoder_kwargs["text"]["freeze"]
    assert cfg.encoder_kwargs["contrastive"]["region_queries"] > 0
    assert Path(cfg.data).name == "qa.jsonl" and Path(str(cfg.captions)).name == "captions.jsonl"


def test_reduced_default_bundle_records_pretrained_model_metrics_and_parity(pretrained_bundle: Path) -> None:
    manifest = load_bundle_manifest(pretrained_bundle)
    assert (manifest.model.image_encoder, manifest.model.text_encoder) == ("efficientnet_lite0", "minilm")
    img = manifest.image
    assert (img.size, img.resize_size, img.resize, img.mean, img.std) == (224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
    assert manifest.text.max_length == 64
    for key in ("test_accuracy", "test_text_to_image_R@1"):
        assert 0.0 <= manifest.metrics[key] <= 1.0
    assert manifest.parity.max_abs_prob_diff <= 1e-4
    assert min(manifest.parity.min_image_embedding_cosine, manifest.parity.min_text_embedding_cosine) >= 0.9999
    assert manifest.seed_index == "seed_index"


def test_exported_encoders_are_the_full_pretrained_networks_not_the_feature_cache(pretrained_bundle: Path) -> None:
    """ORT features of a real photo / sentence equal freshly built pretrained encoders' features."""
    from skimage import data

    from model.encoders.efficientnet_lite import build_efficientnet_lite0
    from model.encoders.minilm import build_minilm

    manifest = load_bundle_manifest(pretrained_bundle)
    image_graph = _session(pretrained_bundle / manifest.graphs["image_encoder"].variants["fp32"].file)
    text_graph = _session(pretrained_bundle / manifest.graphs["text_encoder"].variants["fp32"].file)
    pixels = np.stack([preprocess_pil(Image.fromarray(data.chelsea()), manifest.image),
                       preprocess_pil(Image.fromarray(data.coffee()), manifest.image)])
    tok = TextTokenizer(pretrained_bundle / manifest.text.tokenizer_file, manifest.text.max_length)
    short = tok.encode(["a cat"])
    long = tok.encode(["a cat", "a small red circle at the top left on a gray background"])
    image_encoder, _ = build_efficientnet_lite0()
    text_encoder, _ = build_minilm(pretrained_bundle / manifest.text.tokenizer_file, manifest.text.max_length)
    with torch.no_grad():
        ref_image, ref_regions = image_encoder(torch.from_numpy(pixels))
        ref_text, _ = text_encoder(torch.from_numpy(long.input_ids), torch.from_numpy(long.attention_mask))
    features, regions, embedding = image_graph.run(None, {"pixel_values": pixels})
    np.testing.assert_allclose(features, ref_image.numpy(), atol=1e-4)
    np.testing.assert_allclose(regions, ref_regions.numpy(), atol=1e-4)
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    # Dynamic batch and sequence axes: two lengths, two batch sizes, same answer for the shared text.
    out_short = text_graph.run(None, {"input_ids": short.input_ids, "attention_mask": short.attention_mask})
    out_long = text_graph.run(None, {"input_ids": long.input_ids, "attention_mask": long.attention_mask})
    assert long.input_ids.shape[1] > short.input_ids.shape[1]
    np.testing.assert_allclose(out_long[0], ref_text.numpy(), atol=1e-4)
    np.testing.assert_allclose(out_short[0][0], out_long[0][0], atol=1e-5)
    np.testing.assert_allclose(out_short[2][0], out_long[2][0], atol=1e-5)


@pytest.fixture
def pretrained_client(pretrained_bundle: Path, tmp_path: Path) -> Iterator:
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    settings = Settings(bundle=pretrained_bundle, index_path=tmp_path / "index", intra_op_threads=1, decode_threads=1)
    with TestClient(create_app(settings)) as client:
        yield client


def test_server_loads_the_pretrained_bundle_and_classifies_over_its_labels(
    pretrained_bundle: Path, pretrained_client
) -> None:
    manifest = load_bundle_manifest(pretrained_bundle)
    image = sorted((pretrained_bundle.parent / f".{pretrained_bundle.name}-work" / "demo" / "images").glob("*.png"))[0]
    r = pretrained_client.post("/v1/classify", files={"image": ("a.png", image.read_bytes(), "image/png")},
                               data={"text": "what color is the circle?"})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert sorted(p["label"] for p in predictions) == sorted(manifest.labels)
    assert math.isclose(sum(p["score"] for p in predictions), 1.0, abs_tol=1e-4)
    body = pretrained_client.get("/v1/model").json()
    assert body["labels"] == manifest.labels
    hits = pretrained_client.post("/v1/search", json={"text": "a large red circle", "k": 3})
    assert hits.status_code == 200, hits.text


def test_the_default_bundle_carries_int8_and_fp16_with_their_measured_quality(pretrained_bundle: Path) -> None:
    """What `make serve` builds has the precision variants the server chooses from (int8 on CPU,
    fp16 on CUDA), each with recorded quality; the image encoder measured with its plan only."""
    import json

    from app.inference.runtime import choose_precision
    from model.default_bundle import image_encoder_plan

    manifest = load_bundle_manifest(pretrained_bundle)
    assert set(manifest.precisions()) == {"fp32", "int8", "fp16"}
    for precision in ("int8", "fp16"):
        quality = manifest.quality[precision]  # type: ignore[index]
        assert quality.top1_agreement is not None and 0.0 <= quality.top1_agreement <= 1.0
    image = manifest.graphs["image_encoder"]
    assert image.variants["fp16"].file != image.variants["fp32"].file  # type: ignore[index]
    report = json.loads((pretrained_bundle / "quantization.json").read_text())
    measured = report["graphs"]["image_encoder"]
    plan = [c.name for c in image_encoder_plan()]
    assert [c["candidate"] for c in measured["candidates"]] == plan  # the plan, not the full search
    assert measured["float_search"] is None
    assert measured["chosen"] in {"fp32", *plan} and measured["reason"]
    if measured["chosen"] == "fp32" or "image_encoder" in report["reverted"]:
        assert image.variants["int8"].file == image.variants["fp32"].file  # type: ignore[index]
    else:
        assert image.variants["int8"].file == "image_encoder.int8.onnx"  # type: ignore[index]
    assert report["graphs"]["text_encoder"]["candidates"], "the text encoder's INT8 candidates were measured"
    expected_gpu = "fp16" if manifest.quality["fp16"].top1_agreement >= 0.99 else "fp32"  # type: ignore[index]
    assert choose_precision(manifest, "auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == expected_gpu
