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
    if state.pending_decodes >= state.settings.max_queue_size:
        metrics.REJECTED.labels(graph="decode").inc()
        raise OverloadedError(f"{state.pending_decodes} images are waiting to be decoded; retry shortly")
    # Every decoded image goes to the image encoder next: when its queue is already full, refuse now
    # rather than spend a decode on a request the queue will refuse anyway (under 4x overload the
    # wasted decodes took CPU from the admitted requests).
    if pipeline.batched is not None:
        pipeline.batched.image.refuse_if_full(extra_rows=state.pending_decodes)
    fn = functools.partial(decode_image, data, pipeline.manifest.image,
                           max_pixels=state.settings.max_image_pixels, field=field)
    state.pending_decodes += 1
    try:
        return await metrics.run_in_pool(state.decode_pool, "decode", fn)
    finally:
        state.pending_decodes -= 1


def batched(state: ServiceState) -> BatchedPipeline:
    """The dynamic-batching front of the served pipeline (503 not_ready before start-up / after shutdown)."""
    pipeline = state.require_pipeline()
    if pipeline.batched is None:
        raise NotReadyError()
    return pipeline.batched


async def infer(fn: Callable[..., T], *args: object) -> T:
    return await to_thread.run_sync(functools.partial(fn, *args))
