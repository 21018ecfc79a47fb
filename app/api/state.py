"""What the running service holds, created by the lifespan and reached through dependencies."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from app.api.schemas import ModelRef
from app.core.config import Settings
from app.core.errors import NotReadyError
from app.index import VectorIndex
from app.inference.pipeline import ModelPipeline


@dataclass
class ServiceState:
    settings: Settings
    pipeline: ModelPipeline | None = None
    index: VectorIndex | None = None
    decode_pool: ThreadPoolExecutor | None = None
    ready: bool = False
    notes: dict[str, str] = field(default_factory=dict)

    def model_ref(self) -> ModelRef:
        p = self.require_pipeline()
        return ModelRef(name=p.manifest.name, version=p.manifest.version, precision=p.precision)

    def require_pipeline(self) -> ModelPipeline:
        if self.pipeline is None or not self.ready:
            raise NotReadyError()
        return self.pipeline


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]
