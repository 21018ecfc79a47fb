"""POST /v1/classify: one image + one text -> label probabilities, best first.
POST /v1/classify/batch: many pairs, per-item results, one batched inference call.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel

from app.api.openapi import IMAGE_PART, error_responses, form_or_json_body, json_body
from app.api.payload import (
    check_text,
    content_type,
    decode_base64,
    integer_field,
    parse_json,
    read_payload,
    validate_model,
)
from app.api.schemas import (
    ClassifyBatchItem,
    ClassifyBatchRequest,
    ClassifyBatchResponse,
    ClassifyBatchResult,
    ClassifyJSONRequest,
    ClassifyResponse,
    ErrorDetail,
    Prediction,
)
from app.api.state import State
from app.api.work import batched, decode, refuse_image_work
from app.core.errors import (
    InvalidFieldError,
    MMFusionError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from app.core.json_types import json_type_name
from app.inference.pipeline import Timings

router = APIRouter(prefix="/v1", tags=["inference"])

_ERRORS = error_responses(400, 413, 415, 422, 503)
M = TypeVar("M", bound=BaseModel)

CLASSIFY_BODY = form_or_json_body(ClassifyJSONRequest, {
    "image": IMAGE_PART,
    "text": {"type": "string", "example": "what color is the circle?"},
    "top_k": {"type": "integer", "minimum": 1},
}, required=("image", "text"))


def parse_top_k(raw: object, n_labels: int) -> int:
    if raw is None or raw == "":
        return n_labels
    k = integer_field(raw, "top_k")
    if k < 1:
        raise InvalidFieldError("top_k must be >= 1", field="top_k")
    return min(k, n_labels)


@router.post("/classify", response_model=ClassifyResponse, responses=_ERRORS, openapi_extra=CLASSIFY_BODY,
             summary="Answer a question about an image (classify an image+text pair)")
async def classify(request: Request, state: State) -> ClassifyResponse:
    pipeline = state.require_pipeline()
    settings = state.settings
    refuse_image_work(state)  # before parsing: a classify always carries an image (app/api/work.py)
    payload = await read_payload(request, ClassifyJSONRequest, max_part_bytes=settings.max_upload_bytes)
    text = check_text(payload.text, settings.max_text_chars)
    if payload.image is None:
        raise InvalidFieldError("image is required", field="image")
    top_k = parse_top_k(payload.fields.get("top_k"), len(pipeline.manifest.labels))
    timings = Timings()
    t = time.perf_counter()
    pixels = await decode(state, payload.image, field=payload.image_field)
    timings.add("decode", t)
    probs, truncated = await batched(state).classify(pixels[None], [text], timings)
    p = probs[0]
    order = np.argsort(-p)[:top_k]
    labels = pipeline.manifest.labels
    return ClassifyResponse(
        predictions=[Prediction(label=labels[i], score=float(p[i])) for i in order],
        model=state.model_ref(),
        truncated=truncated[0],
        timings_ms=timings.stages,
    )


# --------------------------------------------------------------------------------------------------
# Batches (shared with POST /v1/index/items/batch)
# --------------------------------------------------------------------------------------------------


async def read_json_items(request: Request, max_items: int) -> list[Any]:
    """The ``items`` list of a JSON batch body, checked for shape and size but not per item.

    The items are validated one by one afterwards, so one bad item becomes that item's error
    instead of failing the whole request. More than ``max_items`` is 413 (the request is
    well-formed but too big, like an oversized body), an empty list is 422.
    """
    ctype, _ = content_type(request)
    if ctype != "application/json":
        raise UnsupportedMediaTypeError(f"Content-Type {ctype or '(none)'} is not supported; send application/json")
    data = parse_json(await request.body())  # strict: 400 if malformed, 422 naming a refused value
    if not isinstance(data, dict) or "items" not in data:
        raise InvalidFieldError('body must be a JSON object {"items": [...]}', field="items")
    extra = sorted(set(data) - {"items"})
    if extra:
        raise InvalidFieldError(f"unknown field(s) {extra}; the body has only 'items'", field=extra[0])
    items = data["items"]
    if not isinstance(items, list):
        raise InvalidFieldError("items must be a list", field="items")
    if not items:
        raise InvalidFieldError("items must not be empty", field="items")
    if len(items) > max_items:
        raise PayloadTooLargeError(f"{len(items)} items in one request, over the limit of {max_items} "
                                   "(MMFUSION_MAX_CLIENT_BATCH); split the batch", field="items")
    return items


def validate_item(model: type[M], raw: object) -> M:
    """One batch item against its model; the error names the field inside the item."""
    if not isinstance(raw, dict):
        raise InvalidFieldError(f"each item must be a JSON object, got {json_type_name(raw)}", field=None)
    return validate_model(model, raw)


def error_detail(exc: MMFusionError) -> ErrorDetail:
    return ErrorDetail(code=exc.code, message=exc.message, field=exc.field)


_BATCH_DESCRIPTION = """Classify up to `MMFUSION_MAX_CLIENT_BATCH` image+text pairs in one request. The body is
`{"items": [{"image_base64", "text", "top_k"?}, ...]}` (JSON only: base64 images).

* Results come back in request order, one per item, each with the HTTP `status` it would have had
  alone. A bad item (invalid base64, undecodable or oversized image, empty or too long text, bad
  `top_k`) gets an `error` (`code`, `message`, `field` naming the field inside the item) and the
  others still succeed; the response is 200 whenever the request itself is well-formed.
* All good items are decoded concurrently in the decode pool and run through the model together
  (one request in each graph's batching queue, possibly merged with other clients' requests).
* More items than the limit: **413** `payload_too_large` with `field: "items"` (nothing is run);
  an empty list or a body that is not `{"items": [...]}`: 422.
"""


@router.post("/classify/batch", response_model=ClassifyBatchResponse, responses=_ERRORS,
             openapi_extra=json_body(ClassifyBatchRequest), summary="Classify many image+text pairs at once",
             description=_BATCH_DESCRIPTION)
async def classify_batch(request: Request, state: State) -> ClassifyBatchResponse:
    pipeline = state.require_pipeline()
    settings = state.settings
    raw_items = await read_json_items(request, settings.max_client_batch)
    n_labels = len(pipeline.manifest.labels)
    results: list[ClassifyBatchResult | None] = [None] * len(raw_items)

    def fail(index: int, exc: MMFusionError) -> None:
        results[index] = ClassifyBatchResult(index=index, status=exc.status_code, error=error_detail(exc))

    prepared: list[tuple[int, bytes, str, int]] = []
    for i, raw in enumerate(raw_items):
        try:
            item = validate_item(ClassifyBatchItem, raw)
            text = check_text(item.text, settings.max_text_chars)
            data = decode_base64(item.image_base64, "image_base64")
        except MMFusionError as exc:
            fail(i, exc)
            continue
        assert text is not None
        prepared.append((i, data, text, min(item.top_k or n_labels, n_labels)))

    timings = Timings()
    t = time.perf_counter()
    decoded = await asyncio.gather(*(decode(state, data, field="image_base64") for _, data, _, _ in prepared),
                                   return_exceptions=True)
    timings.add("decode", t)
    good: list[tuple[int, np.ndarray, str, int]] = []
    for (i, _, text, top_k), pixels in zip(prepared, decoded, strict=True):
        if isinstance(pixels, MMFusionError):
            fail(i, pixels)
        elif isinstance(pixels, BaseException):
            raise pixels
        else:
            good.append((i, pixels, text, top_k))

    if good:
        batch = np.stack([pixels for _, pixels, _, _ in good])
        probs, truncated = await batched(state).classify(batch, [text for _, _, text, _ in good], timings)
        labels = pipeline.manifest.labels
        for row, (i, _, _, top_k) in enumerate(good):
            p = probs[row]
            order = np.argsort(-p)[:top_k]
            results[i] = ClassifyBatchResult(
                index=i, status=200, truncated=truncated[row],
                predictions=[Prediction(label=labels[j], score=float(p[j])) for j in order],
            )
    done = [r for r in results if r is not None]
    assert len(done) == len(results)
    succeeded = sum(1 for r in done if r.error is None)
    return ClassifyBatchResponse(results=done, succeeded=succeeded, failed=len(done) - succeeded,
                                 model=state.model_ref(), timings_ms=timings.stages)
