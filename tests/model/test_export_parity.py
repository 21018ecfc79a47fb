"""ONNX Runtime reproduces PyTorch on the exported graphs, on random and real inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch

from app.bundle import load_bundle_manifest
from app.core.config import Settings
from app.inference.pipeline import ModelPipeline
from app.preprocessing.image import preprocess_pil
from model.train import load_run


def test_every_exported_graph_passes_the_onnx_checker(tiny_bundle: Path) -> None:
    manifest = load_bundle_manifest(tiny_bundle)
    for spec in manifest.graphs.values():
        onnx.checker.check_model(str(tiny_bundle / spec.variants["fp32"].file), full_check=True)


def test_recorded_parity_is_within_tolerance(tiny_bundle: Path) -> None:
    parity = load_bundle_manifest(tiny_bundle).parity
    assert parity.max_abs_prob_diff <= 1e-4
    assert parity.min_image_embedding_cosine >= 0.9999
    assert parity.min_text_embedding_cosine >= 0.9999
    assert "real" in parity.inputs and parity.samples > 8


def test_manifest_metrics_keep_the_epoch_an_integer(tiny_bundle: Path) -> None:
    raw = json.loads((tiny_bundle / "manifest.json").read_text())["metrics"]
    assert isinstance(raw["epoch"], int) and not isinstance(raw["epoch"], bool)
    assert isinstance(raw["train_loss"], float)
    assert load_bundle_manifest(tiny_bundle).metrics["epoch"] == raw["epoch"]


def test_serving_pipeline_matches_pytorch_on_demo_images_with_mixed_lengths(tiny_run: Path, tiny_bundle: Path) -> None:
    """The whole serving path (tokenizer, padding to the batch's longest text, three graphs) vs torch."""
    from PIL import Image

    model, cfg, _ = load_run(tiny_run)
    manifest = load_bundle_manifest(tiny_bundle)
    images = sorted((Path(cfg.demo_dir) / "images").glob("*.png"))[:6]
    texts = ["what color is the circle?", "how many shapes are there?", "is there a red square?",
             "what shape is blue?", "is the triangle large or small?", "what color is the square?"]
    pixels = np.stack([preprocess_pil(Image.open(p), manifest.image) for p in images])
    pipe = ModelPipeline(tiny_bundle, Settings(providers="CPUExecutionProvider"))
    onnx_probs, _ = pipe.classify(pixels, texts)
    enc = pipe.tokenizer.encode(texts)
    with torch.no_grad():
        torch_probs = torch.softmax(
            model(torch.from_numpy(pixels), torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask)), -1
        ).numpy()
    assert np.abs(onnx_probs - torch_probs).max() <= 1e-4
    np.testing.assert_allclose(onnx_probs.sum(1), 1.0, atol=1e-5)


def test_text_features_do_not_depend_on_batch_padding(tiny_bundle: Path) -> None:
    """Dynamic batching pads to the longest text; a text's embedding must not change with it."""
    pipe = ModelPipeline(tiny_bundle, Settings(providers="CPUExecutionProvider"))
    alone, _ = pipe.embed_texts(["what color is the circle?"])
    padded, _ = pipe.embed_texts(["what color is the circle?", "is there a small blue square at the bottom left ?"])
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)


def test_the_manifest_states_every_axis_but_batch_and_sequence(tiny_bundle: Path) -> None:
    manifest = load_bundle_manifest(tiny_bundle)
    for role, spec in manifest.graphs.items():
        for tensor in (*spec.inputs, *spec.outputs):
            symbolic = [d for d in tensor.shape if isinstance(d, str)]
            assert set(symbolic) <= {"batch", "sequence"}, (role, tensor.name, tensor.shape)
    assert manifest.graphs["fusion_head"].outputs[0].shape == ["batch", len(manifest.labels)]
    assert manifest.graphs["image_encoder"].outputs[-1].shape[-1] == manifest.embedding_dim


def test_exporting_the_same_run_again_gives_the_same_graph_files(tiny_run: Path, tiny_bundle: Path,
                                                                 tmp_path: Path) -> None:
    """So the index's embedding fingerprint (and the export id in every graph) survives a re-export."""
    from model.export import export_bundle

    again = export_bundle(tiny_run, tmp_path / "again", progress=False)
    first = load_bundle_manifest(tiny_bundle)
    assert {r: s.variants["fp32"].sha256 for r, s in again.graphs.items()} == \
        {r: s.variants["fp32"].sha256 for r, s in first.graphs.items()}
    assert again.embedding_fingerprint() == first.embedding_fingerprint()
