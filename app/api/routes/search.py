"""POST /v1/search: top-k items of the embedded index for a text, an image, or both.

Combination rule for image+text (queries here, and items stored by ``/v1/index/items`` and
``mmfusion index import``): the two L2-normalised embeddings are averaged and re-normalised, so
each modality counts equally whatever its raw scale. :func:`combine` and :func:`_assemble` (used by
:func:`embed_mixed` and :func:`embed_mixed_batched`) are the one implementation of that rule.

Filters are metadata equality on top-level scalar keys (every key must match, ``1 == 1.0``,
``true != 1``); the top-k is exact within the matching items.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
from fastapi import APIRouter, Request

from app.api.openapi import IMAGE_PART, error_responses, form_or_json_body
from app.api.payload import (
    check_text,
    integer_field,
    parse_json_field,
    read_payload,
)
from app.api.schemas import SearchHit, SearchJSONRequest, SearchResponse
from app.api.state import ServiceState, State
from app.api.work import batched, decode, infer
from app.core.errors import InvalidFieldError
from app.inference.batched import BatchedPipeline
from app.inference.pipeline import ModelPipeline, Timings

# Metadata key under which the index API and CLI record how an item was embedded (see routes/index.py).
SOURCE_KEY = "_source"

router = APIRouter(prefix="/v1", tags=["retrieval"])

SEARCH_BODY = form_or_json_body(SearchJSONRequest, {
    "image": IMAGE_PART,
    "text": {"type": "string"},
    "k": {"type": "integer", "minimum": 1, "default": 10},
    "filter": {"type": "string", "description": "JSON object of metadata equality filters"},
})


def combine(vectors: list[np.ndarray]) -> np.ndarray:
    """Mean of unit embeddings, re-normalised (a zero mean falls back to the first vector)."""
    v = np.mean(np.stack(vectors), axis=0)
    norm = float(np.linalg.norm(v))
    return (v / norm if norm > 0 else vectors[0]).astype(np.float32)


def _split_rows(pixels: Sequence[np.ndarray | None], texts: Sequence[str | None]) -> tuple[list[int], list[int]]:
    if len(texts) != len(pixels):
        raise ValueError(f"{len(pixels)} images for {len(texts)} texts")
    return ([i for i in range(len(pixels)) if pixels[i] is not None],
            [i for i in range(len(texts)) if texts[i] is not None])


def _assemble(n: int, dim: int, image_rows: list[int], image_emb: np.ndarray, text_rows: list[int],
              text_emb: np.ndarray, flags: Sequence[bool]) -> tuple[np.ndarray, list[str], list[bool]]:
    """Per item: the image embedding, the text embedding, or :func:`combine` of both."""
    truncated = [False] * n
    for i, flag in zip(text_rows, flags, strict=True):
        truncated[i] = bool(flag)
    image_of = {row: image_emb[j] for j, row in enumerate(image_rows)}
    text_of = {row: text_emb[j] for j, row in enumerate(text_rows)}
    vectors = np.empty((n, dim), dtype=np.float32)
    kinds: list[str] = []
    for i in range(n):
        image, text = image_of.get(i), text_of.get(i)
        if image is not None and text is not None:
            vectors[i], kind = combine([image, text]), "image+text"
        elif image is not None:
            vectors[i], kind = image, "image"
        elif text is not None:
            vectors[i], kind = text, "text"
        else:
            raise ValueError(f"item {i} has neither an image nor a text")
        kinds.append(kind)
    return vectors, kinds, truncated


def embed_mixed(
    pipeline: ModelPipeline,
    pixels: Sequence[np.ndarray | None],
    texts: Sequence[str | None],
    timings: Timings | None = None,
) -> tuple[np.ndarray, list[str], list[bool]]:
    """Embed items that each have an image, a text or both, with ONE call per encoder (synchronous: CLI).

    Returns ``(vectors [n, dim], embedded_from per item, text truncated per item)``; each vector is
    the image embedding, the text embedding, or :func:`combine` of both. Every item needs at least
    one of the two (callers validate that first). The server uses :func:`embed_mixed_batched`.
    """
    image_rows, text_rows = _split_rows(pixels, texts)
    timings = timings or Timings()
    dim = pipeline.manifest.embedding_dim
    image_emb = np.empty((0, dim), dtype=np.float32)
    text_emb = np.empty((0, dim), dtype=np.float32)
    flags: list[bool] = []
    if image_rows:
        t = time.perf_counter()
        image_emb = pipeline.embed_images(np.stack([pixels[i] for i in image_rows]))  # type: ignore[misc]
        timings.add("image_encoder", t)
    if text_rows:
        t = time.perf_counter()
        text_emb, flags = pipeline.embed_texts([texts[i] for i in text_rows])  # type: ignore[misc]
        timings.add("text_encoder", t)
    return _assemble(len(pixels), dim, image_rows, image_emb, text_rows, text_emb, flags)


async def embed_mixed_batched(
    encoders: BatchedPipeline,
    pixels: Sequence[np.ndarray | None],
    texts: Sequence[str | None],
    timings: Timings | None = None,
) -> tuple[np.ndarray, list[str], list[bool]]:
    """:func:`embed_mixed` through the dynamic batchers; the two encoders run concurrently."""
    image_rows, text_rows = _split_rows(pixels, texts)
    timings = timings or Timings()
    dim = encoders.pipeline.manifest.embedding_dim

    async def images() -> np.ndarray:
        if not image_rows:
            return np.empty((0, dim), dtype=np.float32)
        t = time.perf_counter()
        emb = await encoders.embed_images(np.stack([pixels[i] for i in image_rows]))  # type: ignore[misc]
        timings.add("image_encoder", t)
        return emb

    async def text() -> tuple[np.ndarray, list[bool]]:
        if not text_rows:
            return np.empty((0, dim), dtype=np.float32), []
        t = time.perf_counter()
        out = await encoders.embed_texts([texts[i] for i in text_rows])  # type: ignore[misc]
        timings.add("text_encoder", t)
        return out

    tasks = [asyncio.ensure_future(images()), asyncio.ensure_future(text())]
    try:
        image_emb, (text_emb, flags) = await asyncio.gather(*tasks)  # type: ignore[misc]
    except BaseException:  # one queue full: do not run the other encoder for nothing
        for task in tasks:
            task.cancel()
        raise
    return _assemble(len(pixels), dim, image_rows, image_emb, text_rows, text_emb, flags)


async def embed_one(state: ServiceState, encoders: BatchedPipeline, image: bytes | None, text: str | None,
                    timings: Timings, image_field: str = "image") -> tuple[np.ndarray, str, bool]:
    """One query or item (an image, a text, or both) -> its unit vector, what it was embedded from, and
    whether the text was truncated: decoded in the decode pool, then through the batchers."""
    pixels = None
    if image is not None:
        t = time.perf_counter()
        pixels = await decode(state, image, field=image_field)
        timings.add("decode", t)
    vectors, kinds, truncated = await embed_mixed_batched(encoders, [pixels], [text], timings)
    return vectors[0], kinds[0], truncated[0]


def public_metadata(metadata: dict | None) -> dict:
    """Item metadata as clients see it: without the reserved ``_source`` record."""
    return {k: v for k, v in (metadata or {}).items() if k != SOURCE_KEY}


def _parse_k(raw: object, max_k: int) -> int:
    k = integer_field(raw, "k") if raw is not None and raw != "" else 10
    if not 1 <= k <= max_k:
        raise InvalidFieldError(f"k must be between 1 and {max_k} (MMFUSION_MAX_TOP_K)", field="k")
    return k


def _parse_filter(raw: object) -> dict | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        raw = parse_json_field(raw, "filter")
    if not isinstance(raw, dict) or not all(
        isinstance(v, str | int | float | bool) and not isinstance(v, dict) for v in raw.values()
    ):
        raise InvalidFieldError("filter must be an object of scalar values", field="filter")
    return raw


@router.post("/search", response_model=SearchResponse, openapi_extra=SEARCH_BODY,
             responses=error_responses(400, 413, 415, 422, 503),
             summary="Top-k retrieval over the embedded index by text, image, or both",
             description="The query vector is the image embedding, the text embedding, or (both sent) their "
             "mean re-normalised. `filter` keeps only items whose metadata has every given key with an equal "
             "scalar value; the top-k is exact within those items. 503 `index_unavailable` when the index could "
             "not be opened (the message says how to recover, e.g. `mmfusion index rebuild`).")
async def search(request: Request, state: State) -> SearchResponse:
    encoders = batched(state)
    index = state.require_index()
    payload = await read_payload(request, SearchJSONRequest, max_part_bytes=state.settings.max_upload_bytes)
    text = check_text(payload.text, state.settings.max_text_chars, required=False)
    if payload.image is None and text is None:
        raise InvalidFieldError("send a text, an image, or both", field="text")
    k = _parse_k(payload.fields.get("k"), state.settings.max_top_k)
    flt = _parse_filter(payload.fields.get("filter"))
    timings = Timings()
    vector, kind, _ = await embed_one(state, encoders, payload.image, text, timings, payload.image_field)
    t = time.perf_counter()
    hits = (await infer(index.search, vector, k, flt))[0]
    timings.add("index_search", t)
    return SearchResponse(
        hits=[SearchHit(id=h.id, score=float(h.score), text=h.text, metadata=public_metadata(h.metadata))
              for h in hits],
        query=kind,
        model=state.model_ref(),
        timings_ms=timings.stages,
    )
