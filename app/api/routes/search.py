"""POST /v1/search: top-k items of the embedded index for a text, an image, or both.

Combination rule for image+text queries: the two L2-normalised query embeddings are averaged
and re-normalised, so each modality counts equally whatever its raw scale.
"""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Request

from app.api.payload import check_text, read_payload
from app.api.schemas import ErrorResponse, SearchHit, SearchJSONRequest, SearchResponse
from app.api.state import State
from app.api.work import decode, infer
from app.core.errors import InvalidFieldError, NotReadyError
from app.inference.pipeline import Timings

router = APIRouter(prefix="/v1", tags=["retrieval"])

SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SearchJSONRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "text": {"type": "string"},
                        "k": {"type": "integer", "minimum": 1, "default": 10},
                        "filter": {"type": "string", "description": "JSON object of metadata equality filters"},
                    },
                }
            },
        },
    }
}


def combine(vectors: list[np.ndarray]) -> np.ndarray:
    v = np.mean(np.stack(vectors), axis=0)
    norm = float(np.linalg.norm(v))
    return (v / norm if norm > 0 else vectors[0]).astype(np.float32)


def _parse_k(raw: object, max_k: int) -> int:
    try:
        k = int(str(raw)) if raw is not None and raw != "" else 10
    except ValueError:
        raise InvalidFieldError("k must be an integer", field="k") from None
    if not 1 <= k <= max_k:
        raise InvalidFieldError(f"k must be between 1 and {max_k} (MMFUSION_MAX_TOP_K)", field="k")
    return k


def _parse_filter(raw: object) -> dict | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        import json

        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise InvalidFieldError("filter must be a JSON object", field="filter") from None
    if not isinstance(raw, dict) or not all(
        isinstance(v, str | int | float | bool) and not isinstance(v, dict) for v in raw.values()
    ):
        raise InvalidFieldError("filter must be an object of scalar values", field="filter")
    return raw


@router.post("/search", response_model=SearchResponse, openapi_extra=SEARCH_BODY,
             responses={c: {"model": ErrorResponse} for c in (400, 401, 413, 415, 422, 503)},
             summary="Top-k retrieval over the embedded index by text, image, or both")
async def search(request: Request, state: State) -> SearchResponse:
    pipeline = state.require_pipeline()
    if state.index is None:
        raise NotReadyError(state.notes.get("index", "the vector index is not available"))
    payload = await read_payload(request, SearchJSONRequest, max_part_bytes=state.settings.max_upload_bytes)
    text = check_text(payload.text, state.settings.max_text_chars, required=False)
    if payload.image is None and text is None:
        raise InvalidFieldError("send a text, an image, or both", field="text")
    k = _parse_k(payload.fields.get("k"), state.settings.max_top_k)
    flt = _parse_filter(payload.fields.get("filter"))
    timings = Timings()
    parts: list[np.ndarray] = []
    kinds: list[str] = []
    if payload.image is not None:
        t = time.perf_counter()
        pixels = await decode(state, payload.image)
        parts.append((await infer(pipeline.embed_images, pixels[None]))[0])
        kinds.append("image")
        timings.add("image_encoder", t)
    if text is not None:
        t = time.perf_counter()
        emb, _ = await infer(pipeline.embed_texts, [text])
        parts.append(emb[0])
        kinds.append("text")
        timings.add("text_encoder", t)
    t = time.perf_counter()
    hits = (await infer(state.index.search, combine(parts), k, flt))[0]
    timings.add("index_search", t)
    return SearchResponse(
        hits=[SearchHit(id=h.id, score=float(h.score), text=h.text, metadata=h.metadata or {}) for h in hits],
        query="+".join(kinds),
        model=state.model_ref(),
        timings_ms=timings.stages,
    )
