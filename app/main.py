"""FastAPI app factory. Request lifecycle: decode (thread pool) -> per-graph batching queues
(encoders, then fusion head; one inference thread per graph) -> encode the response.

``uvicorn app.main:app`` serves the bundle named by ``MMFUSION_BUNDLE``; tests call
``create_app(Settings(...))`` and use ``with TestClient(app)`` so the lifespan runs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from app import __version__
from app.api.auth import KeyRing, include_protected
from app.api.errors import install_error_handlers
from app.api.middleware import BodyLimitMiddleware, RequestIdMiddleware, StartupErrorMiddleware
from app.api.routes import classify, embed, health, search
from app.api.routes import index as index_routes
from app.api.state import ServiceState
from app.api.timeout import TimeoutMiddleware
from app.core import metrics
from app.core.config import Settings, get_settings, unknown_variables
from app.core.logging import configure_logging
from app.index import IndexStoreError, VectorIndex
from app.index.seed import seed_index_dir
from app.inference.batched import BatchedPipeline
from app.inference.batcher import BatchingConfig
from app.inference.pipeline import ModelPipeline

log = logging.getLogger("mmfusion.app")


def open_index(state: ServiceState, pipeline: ModelPipeline) -> None:
    """Open the persistent index; seed it from the bundle when there is none yet.

    A corrupt index or one made by another bundle leaves search unavailable with a message
    that says how to recover, instead of silently starting empty.
    """
    settings, manifest = state.settings, pipeline.manifest
    path = settings.index_path
    if manifest.seed_index and seed_index_dir(pipeline.bundle_dir / manifest.seed_index, path):
        log.info("seeded the index at %s from the bundle's %s", path, manifest.seed_index)
    try:
        state.index = VectorIndex.open(path, bundle_name=manifest.name, bundle_version=manifest.version,
                                       dim=manifest.embedding_dim,
                                       embedding_fingerprint=manifest.embedding_fingerprint())
        metrics.INDEX_ITEMS.set(state.index.count)
        metrics.INDEX_AVAILABLE.set(1)
    except IndexStoreError as exc:
        state.index = None
        metrics.INDEX_AVAILABLE.set(0)
        # exc.message names no host path (it reaches clients); the log line below keeps the full detail.
        state.notes["index"] = f"index unavailable: {exc.message}"
        log.error("index at %s unavailable (search and /v1/index answer 503): %s", path, exc)


def freeze_startup_objects() -> None:
    """Move everything alive after start-up (modules, FastAPI routes, pydantic schemas, sessions' Python
    side) out of the cyclic garbage collector's reach (``gc.freeze``).

    Under load the collector's full (generation 2) passes otherwise re-scan all of it while holding
    the GIL: measured at 16 clients on the default bundle, 77-101 ms per pass, stalling the event loop
    and every request in flight; after the freeze, 4 ms. Objects made while serving are collected as
    before. The same move as Instagram's ``gc.freeze()`` before forking workers.
    """
    gc.collect()
    gc.freeze()


def batching_config(settings: Settings) -> BatchingConfig:
    return BatchingConfig(max_batch_size=settings.max_batch_size,
                          max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
                          max_queue_size=settings.max_queue_size,
                          max_queue_wait_s=settings.max_queue_wait_ms / 1000.0)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    for name in unknown_variables(os.environ):  # typos one or two characters off stopped start-up already
        log.warning("environment variable %s is not an mmfusion setting and is ignored (settings: README, "
                    "Configuration)", name)
    # Keys are read now, not in the lifespan: a missing key file must stop the server before it
    # binds a port, never leave it running with fewer keys than intended.
    state = ServiceState(settings=settings, keys=KeyRing.from_settings(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        t0 = time.perf_counter()
        state.decode_pool = ThreadPoolExecutor(settings.resolved_decode_threads(), thread_name_prefix="decode")
        # raises BundleError: refuse to serve it. The graphs run concurrently, one thread each: split the threads.
        pipeline = ModelPipeline(settings.bundle, settings, split_threads=True)
        if settings.warmup:
            pipeline.warmup()
        batched = BatchedPipeline(pipeline, batching_config(settings), image_instances=settings.image_encoder_instances)
        pipeline.batched = batched
        state.pipeline = pipeline
        if "retrieval" not in pipeline.manifest.tasks:
            log.warning("bundle %s was trained without caption pairs (tasks %s): /v1/embed and /v1/search return "
                        "its untrained projections; retrain with --captions for retrieval",
                        pipeline.manifest.name, pipeline.manifest.tasks)
        open_index(state, pipeline)
        assert state.keys is not None
        if not state.keys.enabled or state.keys.reads_open:
            log.warning(state.keys.describe())
        else:
            log.info(state.keys.describe())
        # FastAPI builds the OpenAPI schema on first use (~75 ms here); the metrics of requests refused before
        # routing read it too, so it is built now rather than on the event loop under the first such request.
        app.openapi()
        if settings.gc_freeze:
            freeze_startup_objects()
        state.ready = True
        metrics.READY.set(1)
        log.info("ready in %.2fs: %s %s, precision %s, providers %s", time.perf_counter() - t0,
                 pipeline.manifest.name, pipeline.manifest.version, pipeline.precision, pipeline.active_providers)
        try:
            yield
        finally:
            state.ready = False
            metrics.READY.set(0)
            # New requests now get 503 not_ready; the ones already queued or half-way run to the end.
            await batched.aclose()
            pipeline.batched = None
            if state.index is not None:
                state.index.close()
                metrics.INDEX_AVAILABLE.set(0)
            # Off the event loop: a decode still running would otherwise block it until it ends.
            await asyncio.to_thread(state.decode_pool.shutdown, wait=True, cancel_futures=True)

    app = FastAPIOffline(
        title="mmfusion",
        version=__version__,
        description="Image+text fusion model serving: classification, embeddings and retrieval. "
        "Errors use one schema: `{\"error\": {\"code\", \"message\", \"field\"}}`.\n\n"
        "**Authentication** (when keys are configured): send an API key as `Authorization: Bearer <key>` or "
        "`X-API-Key: <key>` (use *Authorize*). Index writes (POST/DELETE under `/v1/index`) need an admin key. "
        "`/livez`, `/readyz`, `/metrics` and these docs are open. Missing/invalid key: 401; a read key on an "
        "admin route: 403.",
        lifespan=lifespan,
        # A trailing slash gets a JSON 404 that names the route, not Starlette's 307 with an empty body
        # (clients that do not follow redirects saw nothing, and a redirected POST may lose its body).
        redirect_slashes=False,
    )
    app.state.service = state
    install_error_handlers(app)
    # Every router goes through the auth policy (app.api.auth.route_access): routes are protected
    # by default, so a new route cannot be exposed by forgetting a dependency.
    for router in (classify.router, embed.router, search.router, index_routes.router, health.router):
        include_protected(app, router)

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in settings.cors_origins.split(",")],
                           allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    # Per-request deadline (app.api.timeout): 504 + cancel the request's work; inside the request-id
    # middleware so the 504 carries X-Request-ID and is counted in the metrics.
    app.add_middleware(TimeoutMiddleware, timeout_s=settings.request_timeout_s)
    # Outermost: request id, access log, last-resort 500, and the request metrics (it sees the final
    # status of every request, including the 413s BodyLimitMiddleware answers itself).
    app.add_middleware(RequestIdMiddleware, record_metrics=True)
    app.add_middleware(StartupErrorMiddleware)  # lifespan only: a refused start-up is one log line
    return app


def __getattr__(name: str) -> FastAPI:
    """``app.main:app`` is built on first access, so importing this module has no side effects."""
    if name == "app":
        from app.core.config import SettingsError, environment_settings

        try:
            settings = environment_settings()
        except SettingsError as exc:  # SystemExit: uvicorn prints the message and exits, no import traceback
            raise SystemExit(f"error: {exc}") from None
        application = create_app(settings)
        globals()["app"] = application
        return application
    raise AttributeError(name)
