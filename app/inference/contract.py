"""The bundle's graphs checked against its manifest, by running them once, before the server is ready.

The sha256 check in ``app.bundle.verify`` proves the files are the ones the exporter wrote; it says
nothing about whether the manifest *describes* them. A manifest edited by hand (a label removed, a
wrong ``embedding_dim`` or image size) or a graph taken from another export with its hash updated
used to load fine and then fail per request: 500s on every classify (labels shorter than the head's
output), a label that never appears (labels longer), embeddings whose length differs from the
``dimension`` the API reports and an index created with the wrong dimension, or ONNX Runtime's own
shape error naming no file. ONNX Runtime cannot state most output widths up front (the exporter
leaves names such as ``Divimage_embedding_dim_1`` for them), so one probe pass at batch 1, shaped
from the manifest, is what measures them: about as long as one request, once, at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app.bundle.manifest import EXPORT_ID_KEY, BundleManifest, TensorSpec
from app.core.errors import BundleError

if TYPE_CHECKING:
    from app.inference.runtime import GraphSession
    from app.preprocessing.text import TextTokenizer

# Outputs whose last axis must equal a manifest figure: (graph, output) -> what it must equal.
_EMBEDDINGS = (("image_encoder", "image_embedding"), ("text_encoder", "text_embedding"))


def _declared_shape_errors(file: str, declared: list[TensorSpec], actual: Mapping[str, list[object]],
                           kind: str) -> list[str]:
    """Fixed axes the manifest declares that the graph contradicts (rank, or a size both state)."""
    errors = []
    for spec in declared:
        shape = actual.get(spec.name)
        if shape is None:
            errors.append(f"{file} has no {kind} {spec.name!r}, which the manifest declares")
            continue
        if len(shape) != len(spec.shape):
            errors.append(f"{file} {kind} {spec.name!r} has {len(shape)} axes, the manifest declares {spec.shape}")
            continue
        for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
            if isinstance(want, int) and isinstance(got, int) and want != got:
                errors.append(f"{file} {kind} {spec.name!r} axis {axis} is {got}, the manifest declares {want}")
    return errors


def check_declared_shapes(bundle_dir: Path, manifest: BundleManifest, sessions: Mapping[str, GraphSession]) -> None:
    """Manifest vs graph metadata: declared inputs/outputs exist with the declared rank and fixed sizes,
    and the image encoder's input is the manifest's ``image.size``."""
    errors: list[str] = []
    for role, gs in sessions.items():
        spec = manifest.graphs[role]
        inputs = {i.name: list(i.shape) for i in gs.session.get_inputs()}
        outputs = {o.name: list(o.shape) for o in gs.session.get_outputs()}
        errors += _declared_shape_errors(gs.file, spec.inputs, inputs, "input")
        errors += _declared_shape_errors(gs.file, spec.outputs, outputs, "output")
    size = manifest.image.size
    image = sessions["image_encoder"]
    pixels = {i.name: list(i.shape) for i in image.session.get_inputs()}.get("pixel_values")
    if pixels is not None and len(pixels) == 4:
        fixed = [d for d in pixels[2:] if isinstance(d, int)]
        if any(d != size for d in fixed):
            errors.append(f"{image.file} takes {pixels[2]}x{pixels[3]} images but manifest image.size is {size}")
    if errors:
        raise BundleError(f"bundle {bundle_dir}: the manifest does not describe its graphs: " + "; ".join(errors))


def check_same_export(bundle_dir: Path, sessions: Mapping[str, GraphSession]) -> None:
    """The graph files carry one export id (``EXPORT_ID_KEY``): a graph from another export with the same
    shapes and a hand-updated hash would pass every other check and serve embeddings from another space.
    Files without an id (exported before it existed) are not compared."""
    ids: dict[str, str] = {}
    for gs in sessions.values():
        found = gs.session.get_modelmeta().custom_metadata_map.get(EXPORT_ID_KEY)
        if found:
            ids[gs.file] = found
    if len(set(ids.values())) > 1:
        listed = ", ".join(f"{file} export {value[:12]}" for file, value in sorted(ids.items()))
        raise BundleError(f"bundle {bundle_dir}: its graphs come from different exports ({listed}); export the "
                          "bundle again from one run instead of combining files")


def _run(bundle_dir: Path, gs: GraphSession, feeds: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    try:
        return gs.run(feeds)
    except Exception as exc:  # ORT's errors are untyped; the point is to name the file and the input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"bundle {bundle_dir}: {gs.file} fails on {what}: {first}") from None


def probe_graphs(bundle_dir: Path, manifest: BundleManifest, sessions: Mapping[str, GraphSession],
                 tokenizer: TextTokenizer) -> None:
    """One pass at batch 1 through the three graphs, inputs shaped from the manifest; then the widths
    the manifest states (labels, ``embedding_dim``) are compared with what the graphs computed, and
    the tokenizer's largest id is fed to the text encoder (a tokenizer with more tokens than the
    graph's embedding table fails on words the table lacks, or silently renumbers known ones)."""
    size = manifest.image.size
    image = _run(bundle_dir, sessions["image_encoder"], {"pixel_values": np.zeros((1, 3, size, size), np.float32)},
                 f"a 1x3x{size}x{size} image (manifest image.size {size})")
    encoded = tokenizer.encode(["probe"])
    text_feeds = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}
    text = _run(bundle_dir, sessions["text_encoder"], text_feeds, "a tokenized text")
    vocab = tokenizer.vocab_size
    top = {"input_ids": np.full((1, 2), vocab - 1, np.int64), "attention_mask": np.ones((1, 2), np.int64)}
    _run(bundle_dir, sessions["text_encoder"], top,
         f"token id {vocab - 1}, the largest of the bundle's tokenizer ({vocab} tokens): tokenizer and text "
         "encoder come from different models")
    available = {**image, **text, "attention_mask": encoded.attention_mask}
    head = sessions["fusion_head"]
    head_inputs = [i.name for i in head.session.get_inputs()]
    missing = [n for n in head_inputs if n not in available]
    if missing:
        raise BundleError(f"bundle {bundle_dir}: the fusion head takes {missing}, which no encoder outputs")
    probs = _run(bundle_dir, head, {n: available[n] for n in head_inputs}, "the encoders' outputs")
    errors: list[str] = []
    for role, produced in (("image_encoder", image), ("text_encoder", text), ("fusion_head", probs)):
        # The sizes the graphs really computed, against the ones the manifest declares (ONNX Runtime's own
        # metadata leaves most output widths symbolic, so check_declared_shapes could not compare them).
        gs = sessions[role]
        errors += _declared_shape_errors(gs.file, gs.spec.outputs,
                                         {name: list(value.shape) for name, value in produced.items()}, "output")
    width = probs["probabilities"].shape[-1]
    if width != len(manifest.labels):
        errors.append(f"{len(manifest.labels)} labels in the manifest but {head.file} gives {width} probabilities")
    outputs = {"image_encoder": image, "text_encoder": text}
    for role, name in _EMBEDDINGS:
        dim = outputs[role][name].shape[-1]
        if dim != manifest.embedding_dim:
            errors.append(f"{sessions[role].file} gives {dim}-dimensional {name} but manifest "
                          f"embedding_dim is {manifest.embedding_dim}")
    if errors:
        raise BundleError(f"bundle {bundle_dir}: the manifest does not describe its graphs: " + "; ".join(errors))
