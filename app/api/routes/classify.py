"""POST /v1/classify: one image + one text -> label probabilities, best first."""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Request

from app.api.payload import check_text, read_payload
from app.api.schemas import ClassifyJSONRequest, ClassifyResponse, ErrorResponse, Prediction
from app.api.state import State
from app.api.work import decode, infer
from app.core.errors import InvalidFieldError
from app.inference.pipeline import Timings

router = APIRouter(prefix="/v1", tags=["inference"])

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503)}

MULTIPART_AND_JSON = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "text"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "JPEG, PNG, WebP, BMP or GIF"},
                        "text": {"type": "string", "example": "what color is the circle?"},
                        "top_k": {"type": "integer", "minimum": 1},
                    },
                }
            },
            "application/json": {"schema": ClassifyJSONRequest.model_json_schema()},
        },
    }
}


def parse_top_k(raw: object, n_labels: int) -> int:
    if raw is None or raw == "":
        return n_labels
    try:
        k = int(str(raw))
    except ValueError:
        raise InvalidFieldError("top_k must be an integer", field="top_k") from None
    if k < 1:
        raise InvalidFieldError("top_k must be >= 1", field="top_k")
    return min(k, n_labels)


@router.post("/classify", response_model=ClassifyResponse, responses=_ERRORS, openapi_extra=MULTIPART_AND_JSON,
             summary="Answer a question about an image (classify an image+text pair)")
async def classify(request: Request, state: State) -> ClassifyResponse:
    pipeline = state.require_pipeline()
    settings = state.settings
    payload = await read_payload(request, ClassifyJSONRequest, max_part_bytes=settings.max_upload_bytes)
    text = check_text(payload.text, settings.max_text_chars)
    if payload.image is None:
        raise InvalidFieldError("image is required", field="image")
    top_k = parse_top_k(payload.fields.get("top_k"), len(pipeline.manifest.labels))
    timings = Timings()
    t = time.perf_counter()
    pixels = await decode(state, payload.image)
    timings.add("decode", t)
    probs, truncated = await infer(pipeline.classify, pixels[None], [text], timings)
    p = probs[0]
    order = np.argsort(-p)[:top_k]
    labels = pipeline.manifest.labels
    return ClassifyResponse(
        predictions=[Prediction(label=labels[i], score=float(p[i])) for i in order],
        model=state.model_ref(),
        truncated=truncated[0],
        timings_ms=timings.stages,
    )
