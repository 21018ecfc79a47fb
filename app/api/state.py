"""What the running service holds, created by the lifespan and reached through dependencies."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from app.api.schemas import ModelRef
from app.core.config import Settings
from app.core.errors import MMFusionError, NotReadyError
from app.index import VectorIndex
from app.inference.pipeline import ModelPipeline

if TYPE_CHECKING:
    from app.api.auth import KeyRing


class IndexUnavailableError(MMFusionError):
    """The model is served but the vector index could not be opened (corrupt, foreign bundle, locked).

    503 without Retry-After: waiting does not help, an operator has to act on the message (which
    names the recovery, e.g. ``mmfusion index rebuild``).
    """

    status_code = 503
    code = "index_unavailable"


@dataclass
class ServiceState:
    settings: Settings
    keys: KeyRing | None = None
    pipeline: ModelPipeline | None = None
    index: VectorIndex | None = None
    decode_pool: ThreadPoolExecutor | None = None
    ready: bool = False
    notes: dict[str, str] = field(default_factory=dict)
    pending_decodes: int = 0
    """Images accepted for decoding and not yet decoded (event-loop only, so no lock)."""

    def model_ref(self) -> ModelRef:
        p = self.require_pipeline()
        return ModelRef(name=p.manifest.name, version=p.manifest.version, precision=p.precision)

    def stopped_threads(self) -> dict[str, str]:
        """Graphs whose inference thread died, and why (empty before start-up and while all run)."""
        pipeline = self.pipeline
        return pipeline.batched.failures() if pipeline is not None and pipeline.batched is not None else {}

    def require_pipeline(self) -> ModelPipeline:
        if self.pipeline is None or not self.ready:
            raise NotReadyError()
        return self.pipeline

    def require_index(self) -> VectorIndex:
        """The open index, or 503 carrying the reason recorded when opening it failed."""
        self.require_pipeline()
        if self.index is None:
            raise IndexUnavailableError(self.notes.get("index", "the vector index is not available"))
        return self.index


async def get_state(request: Request) -> ServiceState:
    """``async`` on purpose: FastAPI runs a plain ``def`` dependency in its worker thread pool, one
    thread hand-off per request for an attribute read (measured: ~8% of the event loop's time under
    load at 16 clients, most of it waking the pool's thread)."""
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]
