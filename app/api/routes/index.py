"""Index management under /v1/index: add/replace, batch add, get, delete, status.

What is stored for an item: its id, the text it was embedded from (if any), the client's metadata,
and one unit vector made by the same rule as a search query (``search.embed_mixed_batched``): the image
embedding, the text embedding, or the two averaged and re-normalised when both are sent. How the
vector was made is recorded under the reserved metadata key ``_source`` (``embedded_from``, and
``image_path`` when ``mmfusion index import`` read the image from a file), so ``mmfusion index
rebuild`` can re-embed the item under a new bundle. Uploaded images are not kept, so items
embedded from an uploaded image cannot be rebuilt (the rebuild names them). Clients never see
``_source`` in ``metadata``; ``GET /v1/index/items/{id}`` shows it as ``source``.

Every write is acknowledged only once it is durable (fsynced to the index's write-ahead log).
Writes need an admin key when keys are configured (see :mod:`app.api.auth`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Query, Request, Response

from app.api.auth import AdminKey, Principal
from app.api.openapi import IMAGE_PART, error_responses, form_or_json_body, json_body
from app.api.payload import (
    check_text,
    decode_base64,
    parse_json_field,
    read_payload,
)
from app.api.routes.classify import error_detail, read_json_items, validate_item
from app.api.routes.search import SOURCE_KEY, embed_mixed_batched, embed_one, public_metadata
from app.api.schemas import (
    ITEM_ID_DESCRIPTION,
    BundleIdentity,
    IndexBatchRequest,
    IndexBatchResponse,
    IndexBatchResult,
    IndexDeleteResponse,
    IndexItemJSONRequest,
    IndexItemResponse,
    IndexStatusResponse,
    IndexWriteResponse,
    ItemSource,
)
from app.api.state import ServiceState, State
from app.api.work import batched, decode, infer
from app.core import metrics
from app.core.errors import InvalidFieldError, MMFusionError
from app.index import IndexManifest, IndexStoreError, ItemNotFoundError, validate_item_id
from app.index.errors import InvalidItemError
from app.index.store import validate_metadata
from app.index.wal import MANIFEST_FILE
from app.inference.pipeline import Timings

log = logging.getLogger("mmfusion.index.api")
router = APIRouter(prefix="/v1/index", tags=["index"])

ItemId = Annotated[str, Path(description=ITEM_ID_DESCRIPTION + " Anything else is 422.", examples=["sku-123"])]
_WRITE_ERRORS = error_responses(400, 413, 415, 422, 503, 507)  # 507: disk full, nothing stored

ADD_BODY = form_or_json_body(IndexItemJSONRequest, {
    "id": {"type": "string", "example": "sku-123"},
    "image": IMAGE_PART,
    "text": {"type": "string", "example": "a small blue square on a white background"},
    "metadata": {"type": "string", "description": "JSON object, e.g. {\"category\": \"shapes\"}"},
}, required=("id",))


def source_of(metadata: dict[str, Any]) -> ItemSource | None:
    raw = metadata.get(SOURCE_KEY)
    if not isinstance(raw, dict) or not isinstance(raw.get("embedded_from"), str):
        return None
    path = raw.get("image_path")
    return ItemSource(embedded_from=raw["embedded_from"], image_path=path if isinstance(path, str) else None)


def client_metadata(raw: object) -> dict[str, Any]:
    """The client's metadata (a JSON object, or its JSON text from a form field), validated as the
    index will store it, without the reserved key."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        raw = parse_json_field(raw, "metadata")
    if not isinstance(raw, dict):
        raise InvalidFieldError("metadata must be a JSON object", field="metadata")
    if SOURCE_KEY in raw:
        raise InvalidFieldError(f"metadata key {SOURCE_KEY!r} is reserved (it records how the item was embedded)",
                                field="metadata")
    return raw


def stored_metadata(item_id: str, user: dict[str, Any], embedded_from: str, image_path: str | None = None
                    ) -> dict[str, Any]:
    """What the index stores: the client's metadata plus the ``_source`` record, validated here with
    the index's own rules (JSON-only values, depth, size) so that one item cannot fail a batch's
    single ``add_batch`` call. Over HTTP a metadata problem is a field error (``invalid_field``,
    ``field: "metadata"``) like every other field check, whichever rule refused it."""
    metadata = {**user, SOURCE_KEY: {"embedded_from": embedded_from, "image_path": image_path}}
    try:
        validate_metadata(metadata, item_id)
    except InvalidItemError as exc:
        raise InvalidFieldError(exc.message, field=exc.field or "metadata") from None
    return metadata


def _audit(principal: Principal, action: str, ids: list[str], count: int) -> None:
    """Log who changed the index (a key fingerprint, never the key) and keep the gauge current."""
    metrics.INDEX_ITEMS.set(count)
    who = principal.key_id if principal.role is not None else "anonymous"
    log.info("index %s by key %s: %d item(s), first %s; %d items now", action, who, len(ids), ids[:1], count)


@router.post(
    "/items", response_model=IndexWriteResponse, status_code=201, responses={200: {"model": IndexWriteResponse,
                                                                               "description": "An item was replaced"},
                                                                          **_WRITE_ERRORS},
    openapi_extra=ADD_BODY, summary="Add or replace one item (image and/or text, with metadata)",
    description="Multipart (`id`, `image` file, `text`, `metadata` as JSON text) or JSON (`id`, `image_base64`, "
    "`text`, `metadata` object). The stored vector is the image embedding, the text embedding, or both averaged "
    "and re-normalised (the search rule). 201 for a new id, 200 when an item was replaced. Acknowledged once "
    "durable. Ids: 1-256 characters of [A-Za-z0-9._:-]; anything else (path traversal, '/', too long) is 422.",
)
async def add_item(request: Request, response: Response, state: State, principal: AdminKey) -> IndexWriteResponse:
    encoders = batched(state)
    index = state.require_index()
    settings = state.settings
    payload = await read_payload(request, IndexItemJSONRequest, max_part_bytes=settings.max_upload_bytes)
    unknown = sorted(set(payload.fields) - {"id", "metadata"})
    if unknown:
        raise InvalidFieldError(f"unknown field(s) {unknown}; send id, image, text, metadata", field=unknown[0])
    item_id = validate_item_id(payload.fields.get("id") or "", for_write=True)
    text = check_text(payload.text, settings.max_text_chars, required=False)
    if payload.image is None and text is None:
        raise InvalidFieldError("send an image, a text, or both", field="image")
    user = client_metadata(payload.fields.get("metadata"))
    timings = Timings()
    vector, kind, truncated = await embed_one(state, encoders, payload.image, text, timings,
                                              payload.image_field)
    metadata = stored_metadata(item_id, user, kind)
    t = time.perf_counter()
    created = await infer(lambda: index.add(item_id, vector, text=text, metadata=metadata))
    timings.add("index_write", t)
    count = index.count
    _audit(principal, "add", [item_id], count)
    response.status_code = 201 if created else 200
    return IndexWriteResponse(id=item_id, created=created, embedded_from=kind, truncated=truncated,
                              count=count, model=state.model_ref(), timings_ms=timings.stages)


_BATCH_DESCRIPTION = """\
Add or replace up to `MMFUSION_MAX_CLIENT_BATCH` items: `{"items": [{"id", "image_base64"?, "text"?,
"metadata"?}, ...]}`. Each item is validated on its own: a bad one (invalid id, bad base64 or image,
empty text, metadata not an object, an id repeated within the batch) gets an `error` with its status
and the others are still stored. Images are decoded concurrently, each encoder runs once for the
whole batch, and all good items are written with ONE index call (one fsync), acknowledged when
durable. More items than the limit: 413 (`field: "items"`), nothing is stored.
"""


@router.post("/items/batch", response_model=IndexBatchResponse, responses=_WRITE_ERRORS,
             openapi_extra=json_body(IndexBatchRequest), summary="Add or replace many items at once",
             description=_BATCH_DESCRIPTION)
async def add_items(request: Request, state: State, principal: AdminKey) -> IndexBatchResponse:
    encoders = batched(state)
    index = state.require_index()
    settings = state.settings
    raw_items = await read_json_items(request, settings.max_client_batch)
    results: list[IndexBatchResult | None] = [None] * len(raw_items)

    def fail(i: int, exc: MMFusionError, item_id: str | None = None) -> None:
        results[i] = IndexBatchResult(index=i, id=item_id, status=exc.status_code, error=error_detail(exc))

    seen: dict[str, int] = {}
    prepared: list[tuple[int, str, bytes | None, str | None, dict[str, Any]]] = []
    for i, raw in enumerate(raw_items):
        item_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
        try:
            item = validate_item(IndexItemJSONRequest, raw)
            validate_item_id(item.id, for_write=True)
            if item.id in seen:
                raise InvalidFieldError(f"id {item.id!r} is repeated in this batch (first at item {seen[item.id]})",
                                        field="id")
            seen[item.id] = i
            text = check_text(item.text, settings.max_text_chars, required=False)
            data = decode_base64(item.image_base64, "image_base64") if item.image_base64 is not None else None
            if data is None and text is None:
                raise InvalidFieldError("send an image_base64, a text, or both", field="image_base64")
            user = client_metadata(item.metadata)
        except MMFusionError as exc:
            fail(i, exc, item_id)
            continue
        prepared.append((i, item.id, data, text, user))

    timings = Timings()
    t = time.perf_counter()

    async def no_image() -> None:
        return None

    decoded = await asyncio.gather(
        *(decode(state, data, field="image_base64") if data is not None else no_image()
          for _, _, data, _, _ in prepared),
        return_exceptions=True,
    )
    timings.add("decode", t)
    good: list[tuple[int, str, np.ndarray | None, str | None, dict[str, Any]]] = []
    for (i, item_id, _, text, user), pixels in zip(prepared, decoded, strict=True):
        if isinstance(pixels, MMFusionError):
            fail(i, pixels, item_id)
        elif isinstance(pixels, BaseException):
            raise pixels
        else:
            good.append((i, item_id, pixels, text, user))

    if good:
        vectors, kinds, _ = await embed_mixed_batched(encoders, [g[2] for g in good], [g[3] for g in good],
                                                      timings)
        ids, texts, metas, rows = [], [], [], []
        for row, (i, item_id, _, text, user) in enumerate(good):
            try:
                metas.append(stored_metadata(item_id, user, kinds[row]))
            except MMFusionError as exc:
                fail(i, exc, item_id)
                continue
            ids.append(item_id)
            texts.append(text)
            rows.append(row)
        if ids:
            t = time.perf_counter()
            new_ids = await infer(lambda: index.upsert_batch(ids, vectors[rows], texts=texts, metadata=metas))
            timings.add("index_write", t)
            for item_id, row in zip(ids, rows, strict=True):
                i = good[row][0]
                created = item_id in new_ids
                results[i] = IndexBatchResult(index=i, id=item_id, status=201 if created else 200, created=created,
                                              embedded_from=kinds[row])
            _audit(principal, "batch add", ids, index.count)
    count = index.count
    done = [r for r in results if r is not None]
    assert len(done) == len(results)
    added = sum(1 for r in done if r.status == 201)
    replaced = sum(1 for r in done if r.status == 200)
    return IndexBatchResponse(results=done, added=added, replaced=replaced, failed=len(done) - added - replaced,
                              count=count, model=state.model_ref(), timings_ms=timings.stages)


@router.get("/items/{item_id:path}", response_model=IndexItemResponse,
            responses=error_responses(404, 422, 503),
            summary="One item: id, text, metadata and how it was embedded (optionally its vector)")
async def get_item(
    item_id: ItemId,
    state: State,
    include_vector: Annotated[bool, Query(description="Also return the stored unit vector.")] = False,
) -> IndexItemResponse:
    index = state.require_index()
    item = await infer(index.get, item_id)
    return IndexItemResponse(
        id=item.id, text=item.text, metadata=public_metadata(item.metadata), source=source_of(item.metadata),
        vector=item.vector.astype(float).tolist() if include_vector else None,
    )


@router.delete("/items/{item_id:path}", response_model=IndexDeleteResponse,
               responses=error_responses(404, 422, 503, 507),
               summary="Delete one item (404 if there is none with this id)")
async def delete_item(item_id: ItemId, state: State, principal: AdminKey) -> IndexDeleteResponse:
    index = state.require_index()
    validate_item_id(item_id)
    existed = await infer(index.delete, item_id)
    if not existed:
        raise ItemNotFoundError(item_id)
    count = index.count
    _audit(principal, "delete", [item_id], count)
    return IndexDeleteResponse(id=item_id, deleted=True, count=count)


def _disk_identity(state: ServiceState) -> BundleIdentity | None:
    """The bundle named by the index directory's own manifest, for an index that failed to open."""
    try:
        m = IndexManifest.load(state.settings.index_path / MANIFEST_FILE)
    except (IndexStoreError, OSError):
        return None
    return BundleIdentity(name=m.bundle_name, version=m.bundle_version, dimension=m.dim,
                          embedding_fingerprint=m.embedding_fingerprint)


@router.get("", response_model=IndexStatusResponse, responses=error_responses(503),
            summary="Index status: size, dimension, backend, last persisted, bundle identity",
            description="Always 200 once the model is loaded: `available: false` with `message` (how to recover) "
            "when the index could not be opened, e.g. because it was built by another bundle.")
async def index_status(state: State) -> IndexStatusResponse:
    pipeline = state.require_pipeline()
    m = pipeline.manifest
    loaded = BundleIdentity(name=m.name, version=m.version, dimension=m.embedding_dim,
                            embedding_fingerprint=m.embedding_fingerprint())
    index = state.index
    if index is None:
        return IndexStatusResponse(available=False, message=state.notes.get("index", "the index is not available"),
                                   index_bundle=_disk_identity(state), loaded_bundle=loaded)
    s = await infer(index.stats)  # it takes the index lock, which a long write or compaction may hold
    return IndexStatusResponse(
        available=not s.closed, count=s.count, dimension=s.dim, backend=s.backend, durable=s.durable,
        last_persisted=s.last_persisted.isoformat() if s.last_persisted else None,
        last_compacted=s.last_compacted.isoformat() if s.last_compacted else None,
        created_at=s.created_at.isoformat() if s.created_at else None, wal_bytes=s.wal_bytes,
        index_bundle=BundleIdentity(name=s.bundle_name, version=s.bundle_version, dimension=s.dim,
                                    embedding_fingerprint=s.embedding_fingerprint)
        if s.bundle_name and s.bundle_version else None,
        loaded_bundle=loaded,
    )
