"""Request and response models: the OpenAPI schema users read in /docs."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, WithJsonSchema

from app.core.json_types import json_type_name


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_field"])
    message: str = Field(examples=["text must not be empty"])
    field: str | None = Field(default=None, examples=["text"])


class ErrorResponse(BaseModel):
    """The one error schema every non-2xx response uses."""

    error: ErrorDetail


class Prediction(BaseModel):
    label: str = Field(examples=["red"])
    score: float = Field(ge=0, le=1, examples=[0.97])


class ModelRef(BaseModel):
    name: str
    version: str
    precision: str


def _integral(value: object) -> object:
    """``5.0`` as 5: a count a client computed as a float (JavaScript, Java's Double) is still a count.
    Anything else goes on to strict validation (``true`` and ``"5"`` are refused there)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Count = Annotated[int, BeforeValidator(_integral)]
"""An integer field of a JSON body: strict, except that an integer-valued float is accepted."""


class ClassifyJSONRequest(BaseModel):
    """JSON alternative to the multipart form: the image as base64."""

    model_config = ConfigDict(extra="forbid")
    image_base64: str = Field(min_length=1, description="Base64 of the image file bytes (JPEG, PNG, WebP, BMP, GIF).")
    text: str = Field(examples=["what color is the circle?"])
    top_k: Count | None = Field(default=None, ge=1, description="Return only the best k labels (default: all).")


class ClassifyResponse(BaseModel):
    predictions: list[Prediction] = Field(description="Every label (or the top_k best), best first; scores sum to 1.")
    model: ModelRef
    truncated: bool = Field(description="True when the text was longer than the model's max_length tokens.")
    timings_ms: dict[str, float]


class EmbedJSONRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_base64: str | None = None
    text: str | None = Field(default=None, examples=["a large red circle at the top left on a gray background"])


class EmbedResponse(BaseModel):
    dimension: int
    image_embedding: list[float] | None = None
    text_embedding: list[float] | None = None
    truncated: bool = False
    model: ModelRef
    timings_ms: dict[str, float]


def _filter_value(value: object) -> str | int | float | bool:
    if isinstance(value, str | int | float):  # bool is an int
        return value
    raise ValueError(f"a filter value must be a string, number or boolean, not {json_type_name(value)}")


FilterValue = Annotated[
    str | int | float | bool,
    PlainValidator(_filter_value),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}),
]
"""One filter value. Validated by hand: a plain union reports a wrong value once per member type, under
locations such as ``filter.owner.str`` that name pydantic's internals rather than the request."""


class SearchJSONRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_base64: str | None = None
    text: str | None = Field(default=None, examples=["a small blue square on a white background"])
    k: Count = Field(default=10, ge=1)
    filter: dict[str, FilterValue] | None = Field(
        default=None, description="Metadata equality filter: every key must match exactly."
    )


class SearchHit(BaseModel):
    id: str
    score: float
    text: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class SearchResponse(BaseModel):
    hits: list[SearchHit]
    query: str = Field(description="What the query vector was made of: 'text', 'image' or 'image+text'.")
    model: ModelRef
    timings_ms: dict[str, float]


class GraphInfo(BaseModel):
    file: str
    precision: str
    inputs: list[str]
    outputs: list[str]
    providers: list[str]


class ModelInfoResponse(BaseModel):
    name: str
    version: str
    created_at: str
    tasks: list[str]
    labels: list[str]
    embedding_dim: int
    embedding_fingerprint: str = Field(description="Identifies the embedding space (the fp32 encoders' and the "
                                       "tokenizer's hashes): vectors from bundles with another one are not comparable.")
    precision: str
    available_precisions: list[str]
    providers: list[str] = Field(description="ONNX Runtime execution providers really in use.")
    graphs: dict[str, GraphInfo]
    image_preprocessing: dict[str, Any]
    text_max_length: int
    metrics: dict[str, int | float]
    parity: dict[str, Any]
    architecture: dict[str, Any]


class HealthResponse(BaseModel):
    status: str = Field(examples=["ok"])


def inline_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined, for a hand-parsed ``requestBody``.

    Routes that parse their body themselves (to report per-item errors instead of failing the whole
    request) describe it through ``openapi_extra``; a plain ``model_json_schema()`` would carry
    ``#/$defs/...`` references that /docs cannot resolve. The models here are not recursive.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


# --------------------------------------------------------------------------------------------------
# POST /v1/classify/batch
# --------------------------------------------------------------------------------------------------

_PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


class ClassifyBatchItem(BaseModel):
    """One image+text pair of a batch; the same fields as the JSON form of ``POST /v1/classify``."""

    model_config = ConfigDict(extra="forbid")
    image_base64: str = Field(min_length=1, description="Base64 of the image file bytes (JPEG, PNG, WebP, BMP, GIF).",
                              examples=[_PNG_1PX])
    text: str = Field(examples=["what color is the circle?"])
    top_k: Count | None = Field(default=None, ge=1, description="Return only the best k labels (default: all).")


class ClassifyBatchRequest(BaseModel):
    """Up to ``MMFUSION_MAX_CLIENT_BATCH`` pairs; more is refused with 413 (``field: items``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"items": [
            {"image_base64": _PNG_1PX, "text": "what color is the circle?", "top_k": 2},
            {"image_base64": _PNG_1PX, "text": "how many shapes are there?"},
        ]}]},
    )
    items: list[ClassifyBatchItem] = Field(min_length=1)


class ClassifyBatchResult(BaseModel):
    """The outcome of one item, in request order: ``predictions`` on success, else ``error``."""

    index: int = Field(description="Position of the item in the request.", examples=[0])
    status: int = Field(description="HTTP status this item would have had on its own (200, 413, 415 or 422).",
                        examples=[200])
    predictions: list[Prediction] | None = None
    truncated: bool | None = Field(default=None, description="True when the text was longer than max_length tokens.")
    error: ErrorDetail | None = None


class ClassifyBatchResponse(BaseModel):
    results: list[ClassifyBatchResult]
    succeeded: int = Field(examples=[2])
    failed: int = Field(examples=[0])
    model: ModelRef
    timings_ms: dict[str, float] = Field(description="Wall time per stage for the whole batch (one inference call).")


# --------------------------------------------------------------------------------------------------
# /v1/index
# --------------------------------------------------------------------------------------------------

ITEM_ID_DESCRIPTION = "1-256 characters from [A-Za-z0-9._:-] (no '/', spaces or unicode), not '.' or '..'."
EMBEDDED_FROM_DESCRIPTION = (
    "What the stored vector was made of: 'image', 'text', or 'image+text' (the two unit embeddings "
    "averaged and re-normalised, the same rule as an image+text search query)."
)


class IndexItemJSONRequest(BaseModel):
    """JSON form of an index add; the multipart form has the same fields with ``image`` as a file."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"id": "sku-123", "text": "a small blue square on a white background",
             "metadata": {"category": "shapes", "in_stock": True}},
        ]},
    )
    id: str = Field(min_length=1, description=ITEM_ID_DESCRIPTION, examples=["sku-123"])
    image_base64: str | None = Field(default=None, description="Base64 of the image file bytes.")
    text: str | None = Field(default=None, examples=["a small blue square on a white background"])
    metadata: dict[str, Any] | None = Field(
        default=None,
        description="JSON object stored with the item; top-level scalar values can be used as search filters. "
        "The key '_source' is reserved.",
        examples=[{"category": "shapes", "in_stock": True}],
    )


class IndexBatchRequest(BaseModel):
    """Up to ``MMFUSION_MAX_CLIENT_BATCH`` items; more is refused with 413 (``field: items``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"items": [
            {"id": "doc-1", "text": "a large red circle", "metadata": {"split": "demo"}},
            {"id": "doc-2", "image_base64": _PNG_1PX, "text": "a tiny image"},
        ]}]},
    )
    items: list[IndexItemJSONRequest] = Field(min_length=1)


class IndexWriteResponse(BaseModel):
    """Returned once the item is durable (fsynced to the index's write-ahead log)."""

    id: str = Field(examples=["sku-123"])
    created: bool = Field(description="True for a new id (status 201), False when an item was replaced (200).")
    embedded_from: str = Field(description=EMBEDDED_FROM_DESCRIPTION, examples=["text"])
    truncated: bool = Field(default=False, description="True when the text was longer than max_length tokens.")
    count: int = Field(description="Items in the index after this write.", examples=[1024])
    model: ModelRef
    timings_ms: dict[str, float]


class IndexBatchResult(BaseModel):
    index: int = Field(description="Position of the item in the request.")
    id: str | None = None
    status: int = Field(description="201 added, 200 replaced, else the error's status (413, 415 or 422).")
    created: bool | None = None
    embedded_from: str | None = None
    error: ErrorDetail | None = None


class IndexBatchResponse(BaseModel):
    results: list[IndexBatchResult]
    added: int = Field(description="New ids.")
    replaced: int = Field(description="Existing ids whose item was replaced.")
    failed: int
    count: int = Field(description="Items in the index after this write.")
    model: ModelRef
    timings_ms: dict[str, float]


class ItemSource(BaseModel):
    """How the item was embedded, so ``mmfusion index rebuild`` can re-embed it under a new bundle."""

    embedded_from: str = Field(description=EMBEDDED_FROM_DESCRIPTION, examples=["image+text"])
    image_path: str | None = Field(
        default=None,
        description="Image file the vector was made from (set by `mmfusion index import`); null for uploaded "
        "images, which are not kept: such items cannot be rebuilt and must be re-added.",
    )


class IndexItemResponse(BaseModel):
    id: str = Field(examples=["sku-123"])
    text: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict, examples=[{"category": "shapes"}])
    source: ItemSource | None = Field(default=None, description="Null for items added without a recorded source.")
    vector: list[float] | None = Field(default=None, description="The stored unit vector (only with include_vector).")


class IndexDeleteResponse(BaseModel):
    id: str
    deleted: bool = True
    count: int = Field(description="Items in the index after the delete.")


class BundleIdentity(BaseModel):
    name: str = Field(examples=["mmfusion-demo"])
    version: str = Field(examples=["1.0.0"])
    dimension: int = Field(examples=[256])
    embedding_fingerprint: str | None = Field(
        default=None, examples=["3f1c0e9a2b7d4c55"],
        description="Identifies the weights that made the vectors (null for an index written before "
        "fingerprints): an index opens only under a bundle with the same one.")


class IndexStatusResponse(BaseModel):
    """The index as the server sees it, including why it is unavailable when it is."""

    available: bool
    message: str | None = Field(default=None, description="Why the index is unavailable and how to recover.")
    count: int | None = None
    dimension: int | None = None
    backend: str | None = Field(default=None, examples=["faiss-flat-ip"])
    durable: bool | None = Field(default=None, description="Every acknowledged write is fsynced.")
    last_persisted: str | None = Field(default=None, description="ISO time of the last write that reached disk.")
    last_compacted: str | None = None
    created_at: str | None = None
    wal_bytes: int | None = None
    index_bundle: BundleIdentity | None = Field(default=None, description="The bundle whose vectors the index holds.")
    loaded_bundle: BundleIdentity | None = Field(default=None, description="The bundle this server runs.")
