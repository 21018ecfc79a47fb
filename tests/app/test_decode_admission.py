"""The decode stage refuses work at capacity instead of queueing it without bound."""

from __future__ import annotations

from tests.helpers.images import demo_png


def test_full_decode_backlog_gets_503_with_retry_after_and_frees_up_afterwards(client, tiny_config) -> None:
    state = client.app.state.service
    image = demo_png(tiny_config.demo_dir, 0)
    state.pending_decodes = state.settings.max_queue_size
    try:
        r = client.post("/v1/classify", files={"image": ("a.png", image, "image/png")}, data={"text": "what shape?"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "overloaded"
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        state.pending_decodes = 0
    r = client.post("/v1/classify", files={"image": ("a.png", image, "image/png")}, data={"text": "what shape?"})
    assert r.status_code == 200, r.text
    assert state.pending_decodes == 0


def test_a_full_image_queue_refuses_before_decoding_and_text_only_requests_still_pass(client, tiny_config,
                                                                                     monkeypatch) -> None:
    from app.inference.batcher import GraphBatcher

    state = client.app.state.service
    decoded: list[bytes] = []
    import app.api.work as work

    real = work.decode_image
    monkeypatch.setattr(work, "decode_image", lambda data, *a, **k: decoded.append(data) or real(data, *a, **k))
    image = demo_png(tiny_config.demo_dir, 0)
    full = state.settings.max_queue_size
    monkeypatch.setattr(GraphBatcher, "depth", property(lambda self: full if self.name == "image_encoder" else 0))
    r = client.post("/v1/classify", files={"image": ("a.png", image, "image/png")}, data={"text": "what shape?"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "overloaded" and "image_encoder queue is full" in r.json()["error"]["message"]
    assert int(r.headers["Retry-After"]) >= 1
    assert decoded == []  # refused before any decode work was spent on it
    r = client.post("/v1/embed", json={"text": "a small blue square"})  # needs no image encoder: served
    assert r.status_code == 200, r.text
    monkeypatch.setattr(GraphBatcher, "depth", property(lambda self: 0))
    r = client.post("/v1/classify", files={"image": ("a.png", image, "image/png")}, data={"text": "what shape?"})
    assert r.status_code == 200, r.text
    assert decoded == [image]
