"""POST /v1/embed: image and/or text -> L2-normalised embeddings in the shared space."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from app.api.openapi import IMAGE_PART, error_responses, form_or_json_body
from app.api.payload import check_text, read_payload
from app.api.schemas import EmbedJSONRequest, EmbedResponse
from app.api.state import State
from app.api.work import batched, decode
from app.core.errors import InvalidFieldError
from app.inference.pipeline import Timings

router = APIRouter(prefix="/v1", tags=["inference"])

EMBED_BODY = form_or_json_body(EmbedJSONRequest, {
    "image": IMAGE_PART,
    "text": {"type": "string", "example": "a small blue square on a white background"},
})


@router.post("/embed", response_model=EmbedResponse, openapi_extra=EMBED_BODY,
             responses=error_responses(400, 413, 415, 422, 503),
             summary="Embed an image and/or a text into the shared retrieval space")
async def embed(request: Request, state: State) -> EmbedResponse:
    encoders = batched(state)
    pipeline = encoders.pipeline
    payload = await read_payload(request, EmbedJSONRequest, max_part_bytes=state.settings.max_upload_bytes)
    text = check_text(payload.text, state.settings.max_text_chars, required=False)
    if payload.image is None and text is None:
        raise InvalidFieldError("send an image, a text, or both", field="image")
    timings = Timings()
    out = EmbedResponse(dimension=pipeline.manifest.embedding_dim, model=state.model_ref(), timings_ms={})
    if payload.image is not None:
        t = time.perf_counter()
        pixels = await decode(state, payload.image, field=payload.image_field)
        timings.add("decode", t)
        t = time.perf_counter()
        out.image_embedding = (await encoders.embed_images(pixels[None]))[0].astype(float).tolist()
        timings.add("image_encoder", t)
    if text is not None:
        t = time.perf_counter()
        emb, truncated = await encoders.embed_texts([text])
        out.text_embedding = emb[0].astype(float).tolist()
        out.truncated = truncated[0]
        timings.add("text_encoder", t)
    out.timings_ms = timings.stages
    return out
