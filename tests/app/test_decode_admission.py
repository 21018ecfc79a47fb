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
