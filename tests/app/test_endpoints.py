"""Every endpoint through httpx against the app (TestClient runs the lifespan)."""

from __future__ import annotations

import base64
import math

from tests.helpers.images import demo_png, image_bytes


def test_classify_multipart_returns_all_labels_best_first_summing_to_one(client, tiny_config) -> None:
    r = client.post("/v1/classify", files={"image": ("a.png", demo_png(tiny_config.demo_dir), "image/png")},
                    data={"text": "what color is the circle?"})
    assert r.status_code == 200, r.text
    body = r.json()
    scores = [p["score"] for p in body["predictions"]]
    labels = client.get("/v1/model").json()["labels"]
    assert sorted(p["label"] for p in body["predictions"]) == sorted(labels)
    assert scores == sorted(scores, reverse=True)
    assert math.isclose(sum(scores), 1.0, abs_tol=1e-4)
    assert body["model"]["name"] == "tiny-test"
    assert {"decode", "image_encoder", "text_encoder", "fusion_head"} <= set(body["timings_ms"])
    assert body["truncated"] is False


def test_classify_json_with_base64_and_top_k(client) -> None:
    payload = {"image_base64": base64.b64encode(image_bytes("JPEG")).decode(), "text": "how many shapes are there?",
               "top_k": 3}
    r = client.post("/v1/classify", json=payload)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 3


def test_classify_without_text_is_422_naming_the_field(client) -> None:
    r = client.post("/v1/classify", files={"image": ("a.png", image_bytes(), "image/png")})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "text"


def test_classify_with_non_image_is_415(client) -> None:
    r = client.post("/v1/classify", files={"image": ("a.jpg", b"%PDF-1.4 not an image", "image/jpeg")},
                    data={"text": "what color is the circle?"})
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"


def test_embed_returns_unit_vectors_of_the_manifest_dimension(client) -> None:
    r = client.post("/v1/embed", files={"image": ("a.png", image_bytes(), "image/png")},
                    data={"text": "a large red circle"})
    assert r.status_code == 200, r.text
    body = r.json()
    dim = client.get("/v1/model").json()["embedding_dim"]
    assert body["dimension"] == dim == len(body["image_embedding"]) == len(body["text_embedding"])
    for key in ("image_embedding", "text_embedding"):
        assert math.isclose(math.fsum(x * x for x in body[key]), 1.0, abs_tol=1e-4)


def test_embed_text_only_does_not_need_an_image(client) -> None:
    r = client.post("/v1/embed", json={"text": "a small blue square"})
    assert r.status_code == 200
    assert r.json()["image_embedding"] is None


def test_search_returns_the_top_k_with_scores_descending(client) -> None:
    vectors = client.post("/v1/embed", json={"text": "seed"}).json()
    assert vectors["dimension"] > 0
    r = client.post("/v1/search", json={"text": "a large red circle", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == "text"
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)


def test_model_reports_the_providers_really_in_use(client) -> None:
    body = client.get("/v1/model").json()
    assert body["providers"] == ["CPUExecutionProvider"]
    assert set(body["graphs"]) == {"image_encoder", "text_encoder", "fusion_head"}
    assert body["precision"] == "fp32"


def test_health_endpoints(client) -> None:
    assert client.get("/livez").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


def test_metrics_are_prometheus_text_with_request_counts(client) -> None:
    client.get("/livez")
    r = client.get("/metrics")
    assert r.status_code == 200
    assert "mmfusion_requests_total" in r.text
    assert 'route="/livez"' in r.text


def test_unknown_route_uses_the_error_schema(client) -> None:
    r = client.get("/v1/nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_request_id_is_echoed(client) -> None:
    r = client.get("/livez", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


def test_start_up_objects_are_frozen_out_of_the_garbage_collectors_full_passes(settings) -> None:
    import gc

    from fastapi.testclient import TestClient

    from app.main import create_app

    gc.unfreeze()
    try:
        with TestClient(create_app(settings.model_copy(update={"gc_freeze": True}))) as client:
            assert gc.get_freeze_count() > 10_000  # modules, routes, schemas: everything alive at start-up
            assert client.get("/readyz").status_code == 200
    finally:
        gc.unfreeze()
    with TestClient(create_app(settings)):  # MMFUSION_GC_FREEZE=false: nothing frozen
        assert gc.get_freeze_count() == 0
