"""OpenAPI descriptions for routes that parse their own body (``app/api/payload.py``).

FastAPI documents a body from a route's parameters; these routes take ``Request`` and accept either
multipart or JSON, so their ``requestBody`` is written here, once: the JSON schema comes from the
route's pydantic model (inlined, so /docs can resolve it) and the multipart form lists the same
fields with ``image`` as a file part.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from app.api.schemas import ErrorResponse, inline_json_schema

IMAGE_PART: dict[str, Any] = {"type": "string", "format": "binary", "description": "JPEG, PNG, WebP, BMP or GIF"}
"""The multipart ``image`` file part (the formats ``app/preprocessing/image.py`` accepts)."""


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route's error status codes, each with the one error body shape.

    A route that takes a body (413 among its codes) also lists 504: ``MMFUSION_REQUEST_TIMEOUT_S``
    covers the upload and the wait in the batching queues (``app.api.timeout``)."""
    if 413 in codes and 504 not in codes:
        codes = (*codes, 504)
    return {code: {"model": ErrorResponse} for code in codes}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a hand-parsed JSON-only body with ``model``'s schema."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": inline_json_schema(model)}}}}


def form_or_json_body(model: type[BaseModel], form_fields: Mapping[str, dict[str, Any]],
                      required: Iterable[str] = ()) -> dict[str, Any]:
    """``openapi_extra`` for a body sent as multipart (``form_fields``) or as JSON (``model``)."""
    form: dict[str, Any] = {"type": "object", "properties": dict(form_fields)}
    if required := list(required):
        form["required"] = required
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form},
        "application/json": {"schema": inline_json_schema(model)},
    }}}
