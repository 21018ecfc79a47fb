"""POST /v1/classify/batch: per-item results in order, one bad item never sinks the others,
one batched inference call for the good items, and the batch limit."""

from __future__ import annotations

import base64
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers.images import demo_png, image_bytes


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def single(client: TestClient, image: bytes, text: str) -> dict[str, float]:
    r = client.post("/v1/classify", json={"image_base64": b64(image), "text": text})
    assert r.status_code == 200, r.text
    return {p["label"]: p["score"] for p in r.json()["predictions"]}


def test_one_bad_item_gets_its_own_error_and_the_good_ones_match_single_calls(client, tiny_config) -> None:
    img_a, img_b = demo_png(tiny_config.demo_dir, 0), demo_png(tiny_config.demo_dir, 1)
    items = [
        {"image_base64": b64(img_a), "text": "what color is the circle?"},
        {"image_base64": "%%% not base64 %%%", "text": "what color is the circle?"},
        {"image_base64": b64(img_b), "text": "how many shapes are there?", "top_k": 3},
        {"image_base64": b64(b"%PDF-1.4 not an image"), "text": "what shape is it?"},
        {"image_base64": b64(img_a), "text": "   "},
        {"image_base64": b64(img_a)},
        {"image_base64": b64(img_a), "text": "what shape is it?", "top_k": 0},
        "not an object",
        {"image_base64": b64(img_b), "text": "what shape is it?", "colour": "red"},
    ]
    r = client.post("/v1/classify/batch", json={"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert [res["index"] for res in results] == list(range(len(items)))
    assert [res["status"] for res in results] == [200, 422, 200, 415, 422, 422, 422, 422, 422]
    assert (body["succeeded"], body["failed"]) == (2, 7)
    fields = [res["error"]["field"] if res["error"] else None for res in results]
    assert fields == [None, "image_base64", None, "image_base64", "text", "text", "top_k", None, "colour"]
    assert results[3]["error"]["code"] == "unsupported_media_type"
    for res in results:
        assert (res["predictions"] is None) == (res["error"] is not None)

    alone_a = single(client, img_a, "what color is the circle?")
    alone_b = single(client, img_b, "how many shapes are there?")
    batch_a = {p["label"]: p["score"] for p in results[0]["predictions"]}
    batch_b = results[2]["predictions"]
    assert batch_a.keys() == alone_a.keys()
    for label, score in batch_a.items():
        assert score == pytest.approx(alone_a[label], abs=1e-5)
    assert len(batch_b) == 3
    best_alone = sorted(alone_b.items(), key=lambda kv: -kv[1])[:3]
    assert [p["label"] for p in batch_b] == [label for label, _ in best_alone]
    assert [p["score"] for p in batch_b] == pytest.approx([s for _, s in best_alone], abs=1e-5)
    assert body["model"]["name"] == "tiny-test"


def test_good_items_run_as_one_batched_inference_call(client, tiny_config, monkeypatch) -> None:
    pipeline = client.app.state.service.pipeline.batched
    calls: list[tuple[int, int]] = []
    real = pipeline.classify

    def recording(pixels: np.ndarray, texts: list[str], timings=None):  # type: ignore[no-untyped-def]
        calls.append((pixels.shape[0], len(texts)))
        return real(pixels, texts, timings)

    monkeypatch.setattr(pipeline, "classify", recording)
    items = [{"image_base64": b64(demo_png(tiny_config.demo_dir, i)), "text": "what shape is it?"} for i in range(5)]
    items.insert(2, {"image_base64": "!!", "text": "what shape is it?"})
    r = client.post("/v1/classify/batch", json={"items": items})
    assert r.status_code == 200, r.text
    assert calls == [(5, 5)]
    assert r.json()["succeeded"] == 5


def test_all_items_bad_runs_no_inference_and_is_still_200(client, monkeypatch) -> None:
    pipeline = client.app.state.service.pipeline.batched

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("inference must not run without a good item")

    monkeypatch.setattr(pipeline, "classify", boom)
    r = client.post("/v1/classify/batch", json={"items": [{"image_base64": "!!", "text": "x"}]})
    assert r.status_code == 200
    assert (r.json()["succeeded"], r.json()["failed"]) == (0, 1)


def test_images_are_decoded_concurrently_in_the_decode_pool(client, monkeypatch) -> None:
    import app.api.work as work

    lock = threading.Lock()
    state = {"now": 0, "max": 0, "threads": set()}
    real = work.decode_image

    def slow_decode(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            state["threads"].add(threading.current_thread().name)
        time.sleep(0.05)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(work, "decode_image", slow_decode)
    items = [{"image_base64": b64(image_bytes()), "text": "what shape is it?"} for _ in range(4)]
    r = client.post("/v1/classify/batch", json={"items": items})
    assert r.status_code == 200, r.text
    assert state["max"] == 2  # the settings fixture's decode_threads
    assert all(name.startswith("decode") for name in state["threads"])


def test_more_items_than_the_limit_is_413_and_runs_nothing(settings) -> None:
    item = {"image_base64": b64(image_bytes()), "text": "what shape is it?"}
    with TestClient(create_app(settings.model_copy(update={"max_client_batch": 3}))) as c:
        assert c.post("/v1/classify/batch", json={"items": [item] * 3}).status_code == 200
        r = c.post("/v1/classify/batch", json={"items": [item] * 4})
    assert r.status_code == 413
    err = r.json()["error"]
    assert (err["code"], err["field"]) == ("payload_too_large", "items")
    assert "MMFUSION_MAX_CLIENT_BATCH" in err["message"]


@pytest.mark.parametrize(
    ("kwargs", "status", "field"),
    [
        ({"json": {"items": []}}, 422, "items"),
        ({"json": [{"image_base64": "x", "text": "y"}]}, 422, "items"),
        ({"json": {"items": {"image_base64": "x"}}}, 422, "items"),
        ({"json": {"items": [], "extra": 1}}, 422, "extra"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
        ({"files": {"image": ("a.png", image_bytes(), "image/png")}, "data": {"text": "x"}}, 415, None),
    ],
    ids=["empty", "bare-list", "items-not-a-list", "unknown-field", "invalid-json", "multipart"],
)
def test_malformed_batch_requests_fail_as_a_whole(client, kwargs, status: int, field: str | None) -> None:
    r = client.post("/v1/classify/batch", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"].get("field") == field


def test_batch_schema_is_documented_with_an_example(client) -> None:
    op = client.get("/openapi.json").json()["paths"]["/v1/classify/batch"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    item = schema["properties"]["items"]["items"]
    assert set(item["properties"]) == {"image_base64", "text", "top_k"}
    assert "$ref" not in str(schema)
    assert schema["examples"][0]["items"]
    assert "413" in op["responses"]
