"""A manifest that does not describe its graphs is refused at load, naming the mismatch, instead of
serving 500s or silently wrong answers per request (app/inference/contract.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from app.core.config import Settings
from app.core.errors import BundleError
from app.inference.pipeline import ModelPipeline
from tests.helpers.bundles import edit_manifest as edit_bundle_manifest


def edit_manifest(bundle: Path, edit) -> dict:  # type: ignore[no-untyped-def]
    return edit_bundle_manifest(bundle, edit, sync_labels_file=True)


def load(bundle: Path) -> ModelPipeline:
    return ModelPipeline(bundle, Settings(bundle=bundle, providers="CPUExecutionProvider", warmup=False))


def test_the_untouched_bundle_passes_the_probe(bundle_copy: Path) -> None:
    assert load(bundle_copy).manifest.labels


@pytest.mark.parametrize("change", [-1, +1], ids=["fewer-labels", "more-labels"])
def test_a_label_count_unlike_the_heads_output_is_refused(bundle_copy: Path, change: int) -> None:
    def edit(m: dict) -> None:
        m["labels"] = m["labels"][:-1] if change < 0 else [*m["labels"], "extra label"]

    data = edit_manifest(bundle_copy, edit)
    width = len(data["labels"]) - change
    with pytest.raises(BundleError, match=rf"{len(data['labels'])} labels in the manifest but fusion_head"
                                          rf"\.onnx gives {width} probabilities"):
        load(bundle_copy)


def test_an_embedding_dim_unlike_the_graphs_is_refused(bundle_copy: Path) -> None:
    data = edit_manifest(bundle_copy, lambda m: m.update(embedding_dim=m["embedding_dim"] + 3))
    with pytest.raises(BundleError, match=rf"image_encoder\.onnx gives {data['embedding_dim'] - 3}-dimensional "
                                          rf"image_embedding but manifest embedding_dim is {data['embedding_dim']}"):
        load(bundle_copy)


def test_an_image_size_unlike_the_graphs_input_is_refused(bundle_copy: Path) -> None:
    def edit(m: dict) -> None:
        m["image"]["size"] = m["image"]["size"] * 2
        m["image"]["resize_size"] = m["image"]["size"]

    data = edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=rf"image_encoder\.onnx .*manifest image\.size (is )?{data['image']['size']}"):
        load(bundle_copy)


def test_a_tokenizer_with_ids_past_the_text_encoders_table_is_refused(bundle_copy: Path) -> None:
    tok_path = bundle_copy / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    vocab = tok["model"]["vocab"]
    start = max(vocab.values()) + 1
    vocab.update({f"newword{i}": start + i for i in range(5000)})
    tok_path.write_text(json.dumps(tok))
    digest = hashlib.sha256(tok_path.read_bytes()).hexdigest()  # a deliberate swap: the hash is updated too
    edit_manifest(bundle_copy, lambda m: m["text"].update(tokenizer_sha256=digest))
    with pytest.raises(BundleError, match=r"text_encoder\.onnx fails on token id \d+, the largest of the bundle's "
                                          r"tokenizer \(\d+ tokens\): tokenizer and text encoder come from different"):
        load(bundle_copy)


def test_an_unreadable_tokenizer_is_refused_naming_the_file(bundle_copy: Path) -> None:
    tok_path = bundle_copy / "tokenizer.json"
    tok_path.write_text(json.dumps({"version": "1.0"}))
    digest = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    edit_manifest(bundle_copy, lambda m: m["text"].update(tokenizer_sha256=digest))
    with pytest.raises(BundleError, match=r"tokenizer\.json is not a readable tokenizer\.json"):
        load(bundle_copy)


def test_a_missing_labels_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "labels.txt").unlink()
    with pytest.raises(BundleError, match=r"labels\.txt, named by manifest\.json, is missing"):
        load(bundle_copy)


def test_labels_holding_unicode_line_separators_round_trip(bundle_copy: Path) -> None:
    def edit(m: dict) -> None:
        m["labels"] = [f"{label}\u2028x" if i == 0 else label for i, label in enumerate(m["labels"])]

    data = edit_manifest(bundle_copy, edit)
    assert load(bundle_copy).manifest.labels[0] == data["labels"][0]


def test_a_labels_file_saved_with_windows_line_endings_still_agrees(bundle_copy: Path) -> None:
    path = bundle_copy / "labels.txt"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert load(bundle_copy).manifest.labels



def test_every_graph_of_an_export_carries_the_same_export_id(tiny_bundle: Path) -> None:
    import onnx

    from app.bundle import load_bundle_manifest
    from app.bundle.manifest import EXPORT_ID_KEY

    manifest = load_bundle_manifest(tiny_bundle)
    ids = {v.file: {p.key: p.value for p in onnx.load(str(tiny_bundle / v.file)).metadata_props}.get(EXPORT_ID_KEY)
           for spec in manifest.graphs.values() for v in spec.variants.values()}
    assert len(set(ids.values())) == 1 and None not in ids.values(), ids


def test_a_graph_from_another_export_is_refused_even_with_its_hash_updated(bundle_copy: Path) -> None:
    import onnx

    from app.bundle.manifest import EXPORT_ID_KEY

    path = bundle_copy / "image_encoder.onnx"
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == EXPORT_ID_KEY:
            prop.value = "0" * 32  # as if taken from another export of the same architecture
    onnx.save(proto, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def rehash(m: dict) -> None:
        variant = m["graphs"]["image_encoder"]["variants"]["fp32"]
        variant.update(sha256=digest, size_bytes=path.stat().st_size)

    edit_manifest(bundle_copy, rehash)
    with pytest.raises(BundleError, match=r"graphs come from different exports .*image_encoder\.onnx export 0{12}"):
        load(bundle_copy)
