"""Run blocking work (decode, inference) off the event loop.

Request lifecycle: decode (the decode pool, :func:`decode`) -> the graphs' batching queues
(:func:`batched`: one inference thread per ONNX Runtime session, app.inference.batcher) -> encode
the response on the event loop. Other blocking calls (index search and writes) go through
:func:`infer` (AnyIO's worker threads).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from anyio import to_thread

from app.api.state import ServiceState
from app.core import metrics
from app.core.errors import NotReadyError, OverloadedError
from app.inference.batched import BatchedPipeline
from app.preprocessing.image import decode_image

T = TypeVar("T")


async def decode(state: ServiceState, data: bytes, field: str = "image") -> np.ndarray:
    """Decode + preprocess in the dedicated decode pool (its size bounds decode concurrency).

    Admission is bounded like the graph queues: the pool's own queue is unbounded, so without
    this check a flood of uploads would pile up here (holding their bytes) and never see a 503.
    """
    pipeline = state.require_pipeline()
    refuse_image_work(state)
    fn = functools.partial(decode_image, data, pipeline.manifest.image,
                           max_pixels=state.settings.max_image_pixels, field=field)
    state.pending_decodes += 1
    try:
        return await metrics.run_in_pool(state.decode_pool, "decode", fn)
    finally:
        state.pending_decodes -= 1


def refuse_image_work(state: ServiceState) -> None:
    """503 ``overloaded`` now if an image arriving now could not be taken: the decode backlog is at
    ``MMFUSION_MAX_QUEUE_SIZE``, or the image encoder's queue is full in requests or in expected wait
    (images still decoding count as queued ahead).

    :func:`decode` checks this before every decode: under a 4x overload, decodes spent on requests
    the queue then refused took CPU from the admitted ones. Routes whose body always carries an image
    (``/v1/classify``) check it before parsing the body too: parsing and base64-decoding a request
    that will be refused anyway is ~0.3 ms of event-loop time each, at hundreds of refusals a second.
    Uvicorn keeps the connection alive without the unread body.
    """
    if state.pending_decodes >= state.settings.max_queue_size:
        metrics.REJECTED.labels(graph="decode", reason="queue_full").inc()
        raise OverloadedError(f"{state.pending_decodes} images are waiting to be decoded; retry shortly")
    pipeline = state.require_pipeline()
    if pipeline.batched is not None:
        pipeline.batched.image.refuse_if_full(extra_rows=state.pending_decodes)


def batched(state: ServiceState) -> BatchedPipeline:
    """The dynamic-batching front of the served pipeline (503 not_ready before start-up / after shutdown)."""
    pipeline = state.require_pipeline()
    if pipeline.batched is None:
        raise NotReadyError()
    return pipeline.batched


async def infer(fn: Callable[..., T], *args: object) -> T:
    return await to_thread.run_sync(functools.partial(fn, *args))
