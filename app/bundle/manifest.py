"""Pydantic schema of ``manifest.json``, the bundle contract.

Everything the server needs to run a bundle lives here: preprocessing parameters, labels,
tensor names, dtypes and shapes. The server never duplicates any of it as constants, so a
bundle trained with other settings is served correctly without code changes.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"

GraphRole = Literal["image_encoder", "text_encoder", "fusion_head"]
GRAPH_ROLES: tuple[GraphRole, ...] = ("image_encoder", "text_encoder", "fusion_head")
Precision = Literal["fp32", "fp16", "int8"]
Task = Literal["classification", "retrieval"]
TensorDType = Literal["float32", "float16", "int64", "int32"]


class _Strict(BaseModel):
    """Unknown keys are refused: a typo in a hand-edited manifest must not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One graph input or output. Symbolic dimensions are strings (``"batch"``, ``"sequence"``)."""

    name: str = Field(min_length=1)
    dtype: TensorDType
    shape: list[int | str]


EXPORT_ID_KEY = "mmfusion.export_id"
"""ONNX ``metadata_props`` key that every graph file of one export carries with the same value (derived
from the files' contents, so re-exporting the same weights gives the same bytes). Graphs with different
values come from different exports and are refused together (app/inference/contract.py); files without
it (bundles exported before it existed) are not checked."""


class GraphFile(_Strict):
    """One file of one precision variant of a graph; the sha256 is checked at load time."""

    file: str = Field(min_length=1, description="Path relative to the bundle directory.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)


class VariantQuality(_Strict):
    """What a non-reference precision variant costs in quality, measured at export."""

    top1_agreement: float | None = Field(
        default=None, ge=0, le=1, description="Share of demo/test samples whose top-1 equals fp32's."
    )
    accuracy: float | None = Field(default=None, ge=0, le=1)
    accuracy_drop: float | None = None
    min_embedding_cosine: float | None = Field(default=None, ge=-1, le=1)
    samples: int = Field(default=0, ge=0)
    cpu_features: list[str] = Field(
        default_factory=list,
        description="CPU features the figures above depend on (app.inference.cpu_features): a CPU without "
                    "them may compute the variant differently, so `MMFUSION_PRECISION=auto` does not serve it there.",
    )


class GraphSpec(_Strict):
    """A graph's interface (shared by all its precision variants) and the files of each variant."""

    opset: int = Field(ge=7)
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    variants: dict[Precision, GraphFile]

    @model_validator(mode="after")
    def _fp32_is_the_reference(self) -> GraphSpec:
        if "fp32" not in self.variants:
            raise ValueError("every graph needs an 'fp32' variant: it is the reference for the others")
        return self

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


class ImagePreprocessing(_Strict):
    """How raw pixels become the image encoder's input tensor.

    Resize the shorter side to ``resize_size`` with ``resize``, centre-crop ``size`` x ``size``,
    scale to [0, 1] with ``scale``, then ``(x - mean) / std`` per channel.
    """

    size: int = Field(ge=8, le=4096)
    resize_size: int = Field(ge=8, le=8192)
    resize: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    crop: Literal["center"] = "center"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1.0 / 255.0
    channel_order: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    background: tuple[int, int, int] = Field(
        default=(255, 255, 255), description="Colour that transparent pixels are composited onto."
    )

    @model_validator(mode="after")
    def _crop_fits(self) -> ImagePreprocessing:
        if self.resize_size < self.size:
            raise ValueError("resize_size must be >= size (the crop is taken from the resized image)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self


class TextPreprocessing(_Strict):
    """Tokenisation is fully described by a HuggingFace ``tokenizers`` JSON file in the bundle."""

    tokenizer_file: str = "tokenizer.json"
    tokenizer_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    max_length: int = Field(ge=2, le=8192)
    pad_id: int = Field(default=0, ge=0)


class ParityReport(_Strict):
    """ONNX Runtime vs PyTorch on the same inputs, measured at export."""

    max_abs_prob_diff: float = Field(ge=0)
    min_image_embedding_cosine: float
    min_text_embedding_cosine: float
    samples: int = Field(ge=1)
    inputs: str = Field(description="Where the inputs came from, e.g. 'random+demo'.")


class ModelInfo(_Strict):
    """Architecture summary, for humans and ``GET /v1/model``."""

    image_encoder: str
    text_encoder: str
    fusion: str
    parameters: int = Field(ge=0)
    extra: dict[str, str | int | float | bool] = Field(default_factory=dict)


class BundleManifest(_Strict):
    """The whole bundle contract. Paths are relative to the bundle directory."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._+-]+$")
    created_at: datetime
    tasks: list[Task] = Field(min_length=1)
    labels: list[str] = Field(min_length=2)
    labels_file: str = "labels.txt"
    embedding_dim: int = Field(ge=1)
    image: ImagePreprocessing
    text: TextPreprocessing
    graphs: dict[GraphRole, GraphSpec]
    parity: ParityReport
    quality: dict[Precision, VariantQuality] = Field(
        default_factory=dict, description="Per precision variant: agreement with fp32, accuracy."
    )
    metrics: dict[str, int | float] = Field(
        default_factory=dict, description="Flat evaluation metrics on the held-out split, e.g. 'test_accuracy', "
        "and the epoch they were measured after (an integer)."
    )
    model: ModelInfo
    seed_index: str | None = Field(
        default=None, description="Optional directory with an index to seed an empty server index from."
    )

    @model_validator(mode="after")
    def _consistent(self) -> BundleManifest:
        missing = [r for r in GRAPH_ROLES if r not in self.graphs]
        if missing:
            raise ValueError(f"graphs is missing {missing}: a bundle needs all of {list(GRAPH_ROLES)}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        return self

    def precisions(self) -> list[str]:
        """Precisions available for every graph (a variant is usable only if all graphs have it)."""
        sets = [set(g.variants) for g in self.graphs.values()]
        common = set.intersection(*sets) if sets else set()
        return sorted(common, key=["fp32", "fp16", "int8"].index)

    def embedding_fingerprint(self) -> str:
        """Identifies the embedding space: the sha256 of the fp32 image and text encoders' and the
        tokenizer's own sha256s (already in this manifest, so it costs nothing to compute).

        An index stores it and refuses to open under a bundle whose fingerprint differs: name and
        version alone cannot tell two trainings apart (``mmfusion train`` defaults both), and a search
        of vectors from other weights returns confident nonsense. Quantized variants approximate the
        fp32 graphs, so they share the space and the fingerprint."""
        parts = [self.graphs[role].variants["fp32"].sha256 for role in ("image_encoder", "text_encoder")]
        parts.append(self.text.tokenizer_sha256)
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def files(self) -> dict[str, str]:
        """Every file the manifest vouches for, with its expected sha256."""
        out = {self.text.tokenizer_file: self.text.tokenizer_sha256}
        for graph in self.graphs.values():
            for variant in graph.variants.values():
                out[variant.file] = variant.sha256
        return out
