"""The pipeline as the server runs it: every graph behind its own dynamic batcher.

``ModelPipeline`` does the numerics; this class only decides *when* they run. Requests from
different clients that reach a graph while it is busy are merged into one ``run`` call:

* image encoder: pixel arrays concatenated on the batch axis, outputs split back by rows;
* text encoder: the merged texts are tokenised together and padded to the longest miss of the
  text cache (:meth:`ModelPipeline.encode_text_rows`); each text gets its own :class:`TextRow`;
* fusion head: image outputs concatenated, text token vectors zero-padded (attention mask 0) to
  the longest text of the merged batch (:meth:`ModelPipeline.fusion_feeds`).

A classify request runs its image and text encoders concurrently (two different threads), then
the fusion head. All methods are coroutines for the event loop; none blocks it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import numpy as np

from app.core.errors import NotReadyError
from app.core.memory import release_free_heap
from app.inference.batcher import BatchingConfig, GraphBatcher
from app.inference.pipeline import ModelPipeline, TextRow, Timings
from app.inference.runtime import SHRINK_AFTER_ROWS, batch_invariant, dummy_feeds

log = logging.getLogger("mmfusion.batcher")
T = TypeVar("T")

ImageOutputs = dict[str, np.ndarray]
FusionPayload = tuple[ImageOutputs, list[TextRow]]


def _offsets(sizes: Sequence[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    return bounds


def _concat(parts: Sequence[ImageOutputs]) -> ImageOutputs:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


class BatchedPipeline:
    """Async front of a :class:`ModelPipeline`: three :class:`GraphBatcher` (one thread each)."""

    def __init__(self, pipeline: ModelPipeline, config: BatchingConfig, *, image_instances: int = 1):
        """``image_instances``: inference threads of the image encoder (``MMFUSION_IMAGE_ENCODER_INSTANCES``)."""
        self.pipeline = pipeline
        self.config = config
        # A graph whose rows depend on their batch-mates (dynamic INT8: one activation scale per batch)
        # runs one row per call, so an answer never depends on which other requests were queued with
        # it, nor a cached text row on the batch that computed it. The INT8 search (model/quantize.py)
        # judges such graphs at that one-row-per-call cost, so it only picks them when that still wins.
        self.per_row = {role: not batch_invariant(session) for role, session in pipeline.sessions.items()}
        self._largest = {"image_encoder": 0, "text_encoder": 0, "fusion_head": 0}  # rows since the last shrink
        self._last_large = {role: 0.0 for role in self._largest}  # monotonic time of the last large batch
        self._active = 0  # public calls in progress (all on the server's one event loop)
        self._closing = False
        self._idle = asyncio.Event()
        self.image: GraphBatcher[np.ndarray, ImageOutputs] = GraphBatcher(
            "image_encoder", self._run_images, config, on_idle=lambda: self._shrink_if_grown("image_encoder"),
            instances=image_instances)
        self.text: GraphBatcher[list[str], list[TextRow]] = GraphBatcher(
            "text_encoder", self._run_texts, config, on_idle=lambda: self._shrink_if_grown("text_encoder"))
        self.fusion: GraphBatcher[FusionPayload, np.ndarray] = GraphBatcher(
            "fusion_head", self._run_fusion, config, on_idle=lambda: self._shrink_if_grown("fusion_head"))
        self._batchers = {"image_encoder": self.image, "text_encoder": self.text, "fusion_head": self.fusion}

    @asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """Count a public call, so :meth:`aclose` can wait for multi-stage ones (classify) to finish."""
        if self._closing:
            raise NotReadyError("the server is shutting down", retry_after_s=1)
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    # -- batch functions (each on its graph's inference thread) ------------------------------
    def _note_rows(self, role: str, rows: int) -> None:
        """Remember the largest batch since the last shrink; shrink once the load has become light.

        Shrinking at the end of a large batch whenever the queue happened to be empty (the first
        policy) gave the memory back between the batches of a sustained load and made the next batch
        page it in again: measured at 16 closed-loop clients on the default bundle, 55 req/s with it
        against 71 req/s without. So a shrink waits for ``idle_s`` without a large batch: either an
        empty queue for that long (``GraphBatcher(on_idle=...)``) or, under a steady light load that
        never empties the queue for ``idle_s``, only small batches for that long (here, before the
        small batch runs). Without the second rule, a server that took one burst kept its peak
        memory for as long as a trickle of requests went on (measured: 637 MB instead of 243 MB
        during 30 s at half capacity after an overload). A graph run one row per call never grows.
        """
        if self.per_row[role]:
            rows = 1
        now = time.monotonic()
        if rows > SHRINK_AFTER_ROWS:
            self._last_large[role] = now
        elif self._batchers[role].instances == 1 and now - self._last_large[role] >= self.config.idle_s:
            self._shrink_if_grown(role)  # one inference thread: nothing else runs on this session now
        self._largest[role] = max(self._largest[role], rows)

    def _shrink_if_grown(self, role: str) -> None:
        """On the graph's own thread, idle: one 1-row run that shrinks the arena, if a batch grew it."""
        if self._largest[role] <= SHRINK_AFTER_ROWS:
            return
        self._largest[role] = 0
        main = self.pipeline.sessions[role]
        sessions = [main] + [s for s in self.pipeline.image_sessions if s is not main and role == "image_encoder"]
        for session in sessions:  # idle: no inference thread runs any of them now (GraphBatcher's on_idle)
            session.run(dummy_feeds(session.spec, batch=1), shrink_arena=True, record=False)  # housekeeping
        release_free_heap()  # the request path's buffers of the same burst (app/core/memory.py)

    def _run_images(self, payloads: Sequence[np.ndarray]) -> list[ImageOutputs]:
        merged = payloads[0] if len(payloads) == 1 else np.concatenate(payloads)
        self._note_rows("image_encoder", len(merged))
        # Alone, a batch runs on the session with every thread (the lowest latency); beside another
        # instance's batch, on this instance's share (two batches, the threads the cores have).
        instance = None if self.image.running_batches <= 1 else (
            self.image.current_instance() % len(self.pipeline.image_sessions))
        if self.per_row["image_encoder"] and len(merged) > 1:
            out = _concat([self.pipeline.encode_images(merged[i:i + 1], instance=instance)
                           for i in range(len(merged))])
        else:
            out = self.pipeline.encode_images(merged, instance=instance)
        return [{name: v[a:b] for name, v in out.items()} for a, b in _offsets([len(p) for p in payloads])]

    def _run_texts(self, payloads: Sequence[list[str]]) -> list[list[TextRow]]:
        texts = [t for p in payloads for t in p]
        self._note_rows("text_encoder", len(texts))
        if self.per_row["text_encoder"] and len(texts) > 1:
            rows = [row for t in texts for row in self.pipeline.encode_text_rows([t])]
        else:
            rows = self.pipeline.encode_text_rows(texts)
        return [rows[a:b] for a, b in _offsets([len(p) for p in payloads])]

    def _run_fusion(self, payloads: Sequence[FusionPayload]) -> list[np.ndarray]:
        image = _concat([img for img, _ in payloads])
        rows = [r for _, rs in payloads for r in rs]
        if self.per_row["fusion_head"] and len(rows) > 1:
            singles = [self._run_fusion([({k: v[i:i + 1] for k, v in image.items()}, [row])])[0]
                       for i, row in enumerate(rows)]
            merged = np.concatenate(singles)
            return [merged[a:b] for a, b in _offsets([len(rs) for _, rs in payloads])]
        self._note_rows("fusion_head", len(rows))
        probs = self.pipeline.fuse(self.pipeline.fusion_feeds(image, rows))
        return [probs[a:b] for a, b in _offsets([len(rs) for _, rs in payloads])]

    # -- what the routes call -------------------------------------------------------------------
    async def encode_images(self, pixel_values: np.ndarray) -> ImageOutputs:
        async with self._call():
            return await self.image.submit(pixel_values, rows=len(pixel_values))

    async def encode_text_rows(self, texts: list[str]) -> list[TextRow]:
        async with self._call():
            return await self.text.submit(list(texts), rows=len(texts))

    async def classify(self, pixel_values: np.ndarray, texts: list[str], timings: Timings | None = None
                       ) -> tuple[np.ndarray, list[bool]]:
        """[B, 3, H, W] + B texts -> probabilities [B, C] and per-text truncation flags.

        The two encoders run concurrently; ``timings`` gets each one's time including its queue wait.
        """
        if len(pixel_values) != len(texts):
            raise ValueError(f"{len(pixel_values)} images for {len(texts)} texts")
        timings = timings or Timings()

        async def timed(stage: str, work: Awaitable[T]) -> T:
            t = time.perf_counter()
            result = await work
            timings.add(stage, t)
            return result

        async with self._call():
            # The batchers directly, not encode_images/encode_text_rows: those would check _closing again,
            # and a shutdown starting in between would fail a classify this call had already admitted.
            tasks = [asyncio.ensure_future(timed("image_encoder", self.image.submit(pixel_values,
                                                                                   rows=len(pixel_values)))),
                     asyncio.ensure_future(timed("text_encoder", self.text.submit(list(texts), rows=len(texts))))]
            try:
                image, rows = await asyncio.gather(*tasks)
            except BaseException:  # one encoder failed (e.g. its queue is full): do not run the other
                for task in tasks:
                    task.cancel()
                raise
            t = time.perf_counter()
            probs = await self.fusion.submit((image, rows), rows=len(rows))
            timings.add("fusion_head", t)
            return probs, [r.truncated for r in rows]

    async def embed_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return (await self.encode_images(pixel_values))["image_embedding"]

    async def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        rows = await self.encode_text_rows(texts)
        return np.stack([r.outputs["text_embedding"] for r in rows]), [r.truncated for r in rows]

    def failures(self) -> dict[str, str]:
        """Graphs whose inference thread died (empty when all run): see :attr:`GraphBatcher.alive`."""
        return {role: b.failure for role, b in self._batchers.items() if b.failure is not None}

    async def aclose(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new calls, let every call in progress finish (queued work runs), then stop the threads.

        Calls are awaited first because a classify moves from the encoders' queues to the fusion
        head's: closing a batcher under it would fail it half-way.
        """
        self._closing = True
        if self._active:
            self._idle.clear()
            if self._active:
                try:
                    await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
                except TimeoutError:
                    log.error("%d inference calls still running after %.0fs of shutdown", self._active,
                              drain_timeout_s)
        for batcher in (self.image, self.text, self.fusion):
            await asyncio.to_thread(batcher.close)
