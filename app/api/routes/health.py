"""Liveness, readiness, metrics and the model description."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.openapi import error_responses
from app.api.schemas import GraphInfo, HealthResponse, ModelInfoResponse
from app.api.state import State
from app.core.errors import NotAliveError, NotReadyError

router = APIRouter()


# HEAD too: load balancers and probes (HAProxy's default check, some uptime monitors) send HEAD. Not in
# the schema: one operation per path and method keeps the OpenAPI operation ids unique.
@router.head("/livez", include_in_schema=False)
@router.get("/livez", response_model=HealthResponse, tags=["health"], responses=error_responses(503),
            summary="The process is up and every inference thread runs")
async def livez(state: State) -> HealthResponse:
    failed = state.stopped_threads()
    if failed:  # an inference thread died: only a restart brings it back
        raise NotAliveError(f"inference thread(s) stopped: {failed}; restart the process")
    return HealthResponse(status="ok")


@router.head("/readyz", include_in_schema=False)
@router.get("/readyz", response_model=HealthResponse, tags=["health"],
            responses=error_responses(503), summary="Model loaded and warmed up")
async def readyz(state: State) -> HealthResponse:
    if not state.ready:
        raise NotReadyError()
    if state.stopped_threads():
        raise NotReadyError("an inference thread stopped; see /livez", retry_after_s=5)
    return HealthResponse(status="ready")


@router.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/model", response_model=ModelInfoResponse, tags=["model"],
            responses=error_responses(503), summary="The loaded bundle and the providers in use")
async def model_info(state: State) -> ModelInfoResponse:
    p = state.require_pipeline()
    m = p.manifest
    return ModelInfoResponse(
        name=m.name,
        version=m.version,
        created_at=m.created_at.isoformat(),
        tasks=list(m.tasks),
        labels=list(m.labels),
        embedding_dim=m.embedding_dim,
        embedding_fingerprint=m.embedding_fingerprint(),
        precision=p.precision,
        available_precisions=m.precisions(),
        providers=p.active_providers,
        graphs={
            role: GraphInfo(
                file=s.file,
                precision=s.precision,
                inputs=s.input_names,
                outputs=[o.name for o in s.session.get_outputs()],
                providers=s.session.get_providers(),
            )
            for role, s in p.sessions.items()
        },
        image_preprocessing=m.image.model_dump(mode="json"),
        text_max_length=m.text.max_length,
        metrics=m.metrics,
        parity=m.parity.model_dump(mode="json"),
        architecture=m.model.model_dump(mode="json"),
    )
