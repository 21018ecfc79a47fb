"""Request and response models: the OpenAPI schema users read in /docs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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


class ClassifyJSONRequest(BaseModel):
    """JSON alternative to the multipart form: the image as base64."""

    model_config = ConfigDict(extra="forbid")
    image_base64: str = Field(min_length=1, description="Base64 of the image file bytes (JPEG, PNG, WebP, BMP, GIF).")
    text: str = Field(examples=["what color is the circle?"])
    top_k: int | None = Field(default=None, ge=1, description="Return only the best k labels (default: all).")


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


class SearchJSONRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_base64: str | None = None
    text: str | None = Field(default=None, examples=["a small blue square on a white background"])
    k: int = Field(default=10, ge=1)
    filter: dict[str, str | int | float | bool] | None = Field(
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
    precision: str
    available_precisions: list[str]
    providers: list[str] = Field(description="ONNX Runtime execution providers really in use.")
    graphs: dict[str, GraphInfo]
    image_preprocessing: dict[str, Any]
    text_max_length: int
    metrics: dict[str, float]
    parity: dict[str, Any]
    architecture: dict[str, Any]


class HealthResponse(BaseModel):
    status: str = Field(examples=["ok"])
