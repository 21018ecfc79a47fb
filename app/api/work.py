"""Run blocking work (decode, inference) off the event loop."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from anyio import to_thread

from app.api.state import ServiceState
from app.core import metrics
from app.preprocessing.image import decode_image

T = TypeVar("T")


async def decode(state: ServiceState, data: bytes, field: str = "image") -> np.ndarray:
    """Decode + preprocess in the dedicated decode pool (its size bounds decode concurrency)."""
    pipeline = state.require_pipeline()
    fn = functools.partial(decode_image, data, pipeline.manifest.image,
                           max_pixels=state.settings.max_image_pixels, field=field)
    return await metrics.run_in_pool(state.decode_pool, "decode", fn)


async def infer(fn: Callable[..., T], *args: object) -> T:
    return await to_thread.run_sync(functools.partial(fn, *args))
