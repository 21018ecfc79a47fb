"""Index management through the API: add/replace/get/delete/status, the combination rule, every
error status, metadata filters in search, an unavailable index, 10,000 items across a restart,
and concurrent writers and readers."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.bundle.verify import load_bundle_manifest
from app.index import VectorIndex
from app.main import create_app
from tests.helpers.images import demo_png, image_bytes


@contextmanager
def app_client(settings, **update: object) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update=update))) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def nested_lists(depth: int) -> list:
    value: list = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


def embed(client: TestClient, **kwargs: object) -> dict:
    r = client.post("/v1/embed", **kwargs)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    return r.json()


def stored_vector(client: TestClient, item_id: str) -> np.ndarray:
    r = client.get(f"/v1/index/items/{item_id}", params={"include_vector": "true"})
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["vector"], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# add / replace / get / delete / status
# --------------------------------------------------------------------------------------------------


def test_add_get_replace_delete_one_text_item(client) -> None:
    r = client.post("/v1/index/items", json={"id": "doc-1", "text": "a large red circle",
                                             "metadata": {"color": "red", "tags": ["a", "b"]}})
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["id"], body["created"], body["embedded_from"], body["count"]) == ("doc-1", True, "text", 1)
    assert "index_write" in body["timings_ms"]

    got = client.get("/v1/index/items/doc-1").json()
    assert got == {"id": "doc-1", "text": "a large red circle", "metadata": {"color": "red", "tags": ["a", "b"]},
                   "source": {"embedded_from": "text", "image_path": None}, "vector": None}

    replaced = client.post("/v1/index/items", json={"id": "doc-1", "text": "a small blue square"})
    assert replaced.status_code == 200
    assert (replaced.json()["created"], replaced.json()["count"]) == (False, 1)
    got = client.get("/v1/index/items/doc-1").json()
    assert (got["text"], got["metadata"]) == ("a small blue square", {})

    deleted = client.delete("/v1/index/items/doc-1")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": "doc-1", "deleted": True, "count": 0}
    assert client.get("/v1/index/items/doc-1").status_code == 404
    again = client.delete("/v1/index/items/doc-1")
    assert again.status_code == 404
    assert again.json()["error"] == {"code": "not_found", "message": "no item with id 'doc-1' in the index",
                                     "field": "id"}


def test_stored_vector_follows_the_search_combination_rule(client, tiny_config) -> None:
    png = demo_png(tiny_config.demo_dir, 2)
    text = "what color is the circle?"
    ref = embed(client, files={"image": ("a.png", png, "image/png")}, data={"text": text})
    image_emb, text_emb = np.asarray(ref["image_embedding"]), np.asarray(ref["text_embedding"])
    mean = (image_emb + text_emb) / 2
    expected_both = mean / np.linalg.norm(mean)

    both = client.post("/v1/index/items", files={"image": ("a.png", png, "image/png")},
                       data={"id": "both", "text": text, "metadata": '{"kind": "pair"}'})
    assert both.status_code == 201, both.text
    assert both.json()["embedded_from"] == "image+text"
    image_only = client.post("/v1/index/items", json={"id": "img", "image_base64": b64(png)})
    assert image_only.json()["embedded_from"] == "image"
    text_only = client.post("/v1/index/items", json={"id": "txt", "text": text})
    assert text_only.json()["embedded_from"] == "text"

    np.testing.assert_allclose(stored_vector(client, "both"), expected_both, atol=1e-5)
    np.testing.assert_allclose(stored_vector(client, "img"), image_emb, atol=1e-5)
    np.testing.assert_allclose(stored_vector(client, "txt"), text_emb, atol=1e-5)
    assert client.get("/v1/index/items/both").json()["metadata"] == {"kind": "pair"}

    # The same image+text as a query finds the item with cosine ~1.
    hit = client.post("/v1/search", files={"image": ("a.png", png, "image/png")},
                      data={"text": text, "k": "1"}).json()
    assert hit["query"] == "image+text"
    assert hit["hits"][0]["id"] == "both"
    assert hit["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_index_status_reports_size_identity_and_persistence(client) -> None:
    before = client.get("/v1/index").json()
    assert before["available"] is True
    assert before["count"] == 0
    client.post("/v1/index/items", json={"id": "a", "text": "a red circle"})
    status = client.get("/v1/index").json()
    model = client.get("/v1/model").json()
    assert status["count"] == 1
    assert status["dimension"] == model["embedding_dim"]
    assert status["backend"] == "faiss-flat-ip"
    assert status["durable"] is True
    assert status["last_persisted"] is not None
    assert status["wal_bytes"] > 0
    identity = {"name": model["name"], "version": model["version"], "dimension": model["embedding_dim"],
                "embedding_fingerprint": model["embedding_fingerprint"]}
    assert status["index_bundle"] == status["loaded_bundle"] == identity
    assert status["message"] is None


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"text": "x"}, 422, "invalid_field", "id"),
        ({"id": "../../etc/passwd", "text": "x"}, 422, "invalid_id", "id"),
        ({"id": "a" * 257, "text": "x"}, 422, "invalid_id", "id"),
        ({"id": "héllo", "text": "x"}, 422, "invalid_id", "id"),
        ({"id": "x"}, 422, "invalid_field", "image"),
        ({"id": "x", "text": "   "}, 422, "invalid_field", "text"),
        ({"id": "x", "text": "y", "metadata": [1, 2]}, 422, "invalid_field", "metadata"),
        ({"id": "x", "text": "y", "metadata": {"_source": {"image_path": "/etc/passwd"}}}, 422, "invalid_field",
         "metadata"),
        ({"id": "x", "text": "y", "metadata": {"deep": {"big": "z" * 70_000}}}, 422, "invalid_field", "metadata"),
        ({"id": "x", "text": "y", "metadata": {"a": nested_lists(40)}},
         422, "invalid_field", "metadata"),
        ({"id": "x", "image_base64": "!!!"}, 422, "invalid_field", "image_base64"),
        ({"id": "x", "image_base64": b64(b"plain text, not an image")}, 415, "unsupported_media_type", "image_base64"),
        ({"id": "x", "text": "y", "vector": [1, 2]}, 422, "invalid_field", "vector"),
    ],
    ids=["no-id", "traversal", "too-long", "unicode", "no-content", "blank-text", "metadata-list", "reserved-key",
         "metadata-too-big", "metadata-too-deep", "bad-base64", "not-an-image", "unknown-field"],
)
def test_add_refuses_bad_items_with_the_error_schema(client, body: dict, status: int, code: str, field: str) -> None:
    r = client.post("/v1/index/items", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["field"] == field
    assert client.get("/v1/index").json()["count"] == 0


@pytest.mark.parametrize(
    "path",
    ["..%2F..%2Fetc%2Fpasswd", "a%2Fb", "%2E%2E", "a b", "x" * 300, "caf%C3%A9"],
    ids=["encoded-traversal", "slash", "dotdot", "space", "too-long", "unicode"],
)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_bad_ids_in_the_path_are_422_never_a_lookup(client, path: str, method: str) -> None:
    client.post("/v1/index/items", json={"id": "a", "text": "a red circle"})
    r = client.request(method, f"/v1/index/items/{path}")
    if path == "%2E%2E":
        # ".." is a valid id (dots are allowed) that does not exist: a plain 404, no traversal.
        assert r.status_code == 404, r.text
        return
    assert r.status_code == 422, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["field"]) == ("invalid_id", "id")
    assert client.get("/v1/index").json()["count"] == 1


def test_multipart_add_errors(client) -> None:
    png = image_bytes()
    bad_json = client.post("/v1/index/items", files={"image": ("a.png", png, "image/png")},
                           data={"id": "x", "metadata": "{not json"})
    assert (bad_json.status_code, bad_json.json()["error"]["field"]) == (422, "metadata")
    unknown = client.post("/v1/index/items", files={"image": ("a.png", png, "image/png")},
                          data={"id": "x", "top_k": "3"})
    assert (unknown.status_code, unknown.json()["error"]["field"]) == (422, "top_k")
    no_id = client.post("/v1/index/items", files={"image": ("a.png", png, "image/png")})
    assert (no_id.status_code, no_id.json()["error"]["field"]) == (422, "id")
    wrong_type = client.post("/v1/index/items", content=b"id=x", headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 415


def test_oversized_bodies_and_texts_are_413(settings) -> None:
    with app_client(settings, max_upload_bytes=4096, max_text_chars=50) as c:
        big = c.post("/v1/index/items", json={"id": "x", "text": "y" * 8000})
        assert big.status_code == 413
        long_text = c.post("/v1/index/items", json={"id": "x", "text": "word " * 20})
        assert (long_text.status_code, long_text.json()["error"]["field"]) == (413, "text")
        assert c.get("/v1/index").json()["count"] == 0


# --------------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------------


def test_batch_add_reports_per_item_and_writes_once(client, tiny_config, monkeypatch) -> None:
    client.post("/v1/index/items", json={"id": "old", "text": "a tiny green triangle"})
    index = client.app.state.service.index
    writes: list[int] = []
    real = index.upsert_batch

    def recording(ids, vectors, **kwargs):  # type: ignore[no-untyped-def]
        writes.append(len(ids))
        return real(ids, vectors, **kwargs)

    monkeypatch.setattr(index, "upsert_batch", recording)
    png = b64(demo_png(tiny_config.demo_dir, 3))
    items = [
        {"id": "t1", "text": "a large red circle", "metadata": {"n": 1}},
        {"id": "old", "text": "a replaced item"},
        {"id": "bad/id", "text": "x"},
        {"id": "i1", "image_base64": png},
        {"id": "t1", "text": "the same id twice"},
        {"id": "i2", "image_base64": b64(b"not an image")},
        {"id": "both", "image_base64": png, "text": "what shape is it?"},
        {"id": "meta", "text": "x", "metadata": "not-an-object"},
        {"id": "empty"},
    ]
    r = client.post("/v1/index/items/batch", json={"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["status"] for x in body["results"]] == [201, 200, 422, 201, 422, 415, 201, 422, 422]
    assert [x["id"] for x in body["results"]] == [i.get("id") for i in items]
    assert [x["embedded_from"] for x in body["results"]] == ["text", "text", None, "image", None, None,
                                                            "image+text", None, None]
    assert (body["added"], body["replaced"], body["failed"], body["count"]) == (3, 1, 5, 4)
    assert writes == [4]
    assert "repeated in this batch" in body["results"][4]["error"]["message"]
    assert client.get("/v1/index/items/t1").json()["metadata"] == {"n": 1}
    assert client.get("/v1/index/items/old").json()["text"] == "a replaced item"
    assert client.get("/v1/index/items/i2").status_code == 404


def test_batch_over_the_limit_is_413_and_stores_nothing(settings) -> None:
    items = [{"id": f"d{i}", "text": "a red circle"} for i in range(5)]
    with app_client(settings, max_client_batch=4) as c:
        r = c.post("/v1/index/items/batch", json={"items": items})
        assert (r.status_code, r.json()["error"]["field"]) == (413, "items")
        assert c.get("/v1/index").json()["count"] == 0
        assert c.post("/v1/index/items/batch", json={"items": items[:4]}).json()["added"] == 4


# --------------------------------------------------------------------------------------------------
# search: filters, hidden _source, unavailable index
# --------------------------------------------------------------------------------------------------

FILTER_ITEMS = [
    {"id": "r1", "text": "a large red circle", "metadata": {"color": "red", "n": 1, "flag": True}},
    {"id": "r2", "text": "a small red square", "metadata": {"color": "red", "n": 2, "flag": False}},
    {"id": "r3", "text": "a red triangle at the top", "metadata": {"color": "red", "n": 1.0}},
    {"id": "b1", "text": "a large blue circle", "metadata": {"color": "blue", "n": 1, "flag": True}},
    {"id": "b2", "text": "a small blue square", "metadata": {"color": "blue", "n": 3, "nested": {"a": 1}}},
    {"id": "g1", "text": "a green circle"},
]


def hit_ids(client: TestClient, **body: object) -> list[str]:
    r = client.post("/v1/search", json={"text": "a large red circle", "k": 10, **body})
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["hits"]]


def test_search_filters_on_metadata_equality_and_ranks_exactly_within_the_matches(client) -> None:
    assert client.post("/v1/index/items/batch", json={"items": FILTER_ITEMS}).json()["failed"] == 0
    everything = hit_ids(client)
    assert sorted(everything) == sorted(i["id"] for i in FILTER_ITEMS)
    red = hit_ids(client, filter={"color": "red"})
    assert red == [i for i in everything if i in {"r1", "r2", "r3"}]  # same order as the unfiltered ranking
    assert sorted(hit_ids(client, filter={"color": "red", "n": 1})) == ["r1", "r3"]  # 1 == 1.0
    assert sorted(hit_ids(client, filter={"n": 1.0})) == ["b1", "r1", "r3"]
    assert sorted(hit_ids(client, filter={"flag": True})) == ["b1", "r1"]  # true is not 1
    assert hit_ids(client, filter={"flag": 1}) == []
    assert hit_ids(client, filter={"color": "purple"}) == []
    assert hit_ids(client, filter={"no-such-key": "x"}) == []
    assert hit_ids(client, filter={"color": "red"}, k=2) == red[:2]
    form = {"text": (None, "a circle"), "filter": (None, '{"color": "blue"}'), "k": (None, "5")}
    multipart = client.post("/v1/search", files=form)
    assert sorted(h["id"] for h in multipart.json()["hits"]) == ["b1", "b2"]


@pytest.mark.parametrize(
    "bad", [{"nested": {"a": 1}}, {"tags": ["a"]}, "color=red", {"color": None}], ids=["object", "list", "string",
                                                                                        "null"])
def test_search_with_a_non_scalar_filter_is_422(client, bad: object) -> None:
    r = client.post("/v1/search", json={"text": "a red circle", "filter": bad})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"].startswith("filter")


def test_search_hits_never_show_the_internal_source_record(client) -> None:
    client.post("/v1/index/items", json={"id": "a", "text": "a red circle", "metadata": {"color": "red"}})
    hits = client.post("/v1/search", json={"text": "a red circle"}).json()["hits"]
    assert hits[0]["metadata"] == {"color": "red"}


def test_an_index_of_another_bundle_makes_search_and_writes_503_with_the_recovery(settings, tiny_bundle) -> None:
    dim = load_bundle_manifest(tiny_bundle).embedding_dim
    VectorIndex.open(settings.index_path, bundle_name="other-model", bundle_version="9.9", dim=dim).close()
    with app_client(settings) as c:
        for r in (c.post("/v1/search", json={"text": "a red circle"}),
                  c.post("/v1/index/items", json={"id": "x", "text": "a red circle"}),
                  c.get("/v1/index/items/x")):
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "index_unavailable"
            assert "mmfusion index rebuild" in err["message"]
            assert "other-model" in err["message"]
        status = c.get("/v1/index").json()
        assert status["available"] is False
        assert "mmfusion index rebuild" in status["message"]
        assert status["index_bundle"] == {"name": "other-model", "version": "9.9", "dimension": dim,
                                          "embedding_fingerprint": None}
        assert status["loaded_bundle"]["name"] == "tiny-test"
        # The rest of the service keeps working.
        assert c.post("/v1/embed", json={"text": "a red circle"}).status_code == 200
        assert c.get("/readyz").status_code == 200


def test_an_index_of_other_weights_under_the_same_name_and_version_is_refused(settings, tiny_bundle) -> None:
    # A retraining exported under the default name and version: only the embedding fingerprint differs.
    manifest = load_bundle_manifest(tiny_bundle)
    with VectorIndex.open(settings.index_path, bundle_name=manifest.name, bundle_version=manifest.version,
                          dim=manifest.embedding_dim, embedding_fingerprint="0123456789abcdef") as index:
        index.add("a", np.ones(manifest.embedding_dim))
    with app_client(settings) as c:
        err = c.post("/v1/search", json={"text": "a red circle"}).json()["error"]
        assert err["code"] == "index_unavailable"
        assert "fingerprint 0123456789abcdef" in err["message"] and "mmfusion index rebuild" in err["message"]
        status = c.get("/v1/index").json()
        assert status["index_bundle"]["embedding_fingerprint"] == "0123456789abcdef"
        assert status["loaded_bundle"]["embedding_fingerprint"] == manifest.embedding_fingerprint()
        assert c.get("/v1/model").json()["embedding_fingerprint"] == manifest.embedding_fingerprint()


def test_a_corrupt_index_is_reported_not_silently_replaced(settings) -> None:
    settings.index_path.mkdir(parents=True)
    (settings.index_path / "index.json").write_text("{broken")
    with app_client(settings) as c:
        r = c.post("/v1/search", json={"text": "a red circle"})
        assert r.status_code == 503
        assert "corrupt" in r.json()["error"]["message"]
        assert c.get("/v1/index").json()["available"] is False
    assert (settings.index_path / "index.json").read_text() == "{broken"


# --------------------------------------------------------------------------------------------------
# scale, restart and concurrency
# --------------------------------------------------------------------------------------------------

N_SEEDED = 10_000
SHARDS = 100


def test_ten_thousand_items_survive_a_restart_and_are_all_found(settings, tiny_bundle) -> None:
    """10,000 random unit vectors seeded directly (fast), then add/search/delete through the API,
    restart, and find every item again with filtered searches that together cover the index."""
    manifest = load_bundle_manifest(tiny_bundle)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N_SEEDED, manifest.embedding_dim)).astype(np.float32)
    ids = [f"seed-{i:05d}" for i in range(N_SEEDED)]
    with VectorIndex.open(settings.index_path, bundle_name=manifest.name, bundle_version=manifest.version,
                          dim=manifest.embedding_dim) as index:
        index.add_batch(ids, vectors, metadata=[{"shard": i % SHARDS} for i in range(N_SEEDED)])

    api_items = [{"id": f"api-{i:03d}", "text": f"a {c} circle", "metadata": {"shard": "api", "i": i}}
                 for i, c in enumerate(["red", "green", "blue", "yellow", "purple"] * 30)]
    deleted = {"seed-00000", "seed-04242", "api-007"}
    with app_client(settings) as c:
        assert c.get("/v1/index").json()["count"] == N_SEEDED
        for start in range(0, len(api_items), 64):
            r = c.post("/v1/index/items/batch", json={"items": api_items[start:start + 64]})
            assert r.json()["failed"] == 0, r.text
        for item_id in deleted:
            assert c.delete(f"/v1/index/items/{item_id}").status_code == 200
        expected_count = N_SEEDED + len(api_items) - len(deleted)
        assert c.get("/v1/index").json()["count"] == expected_count

    with app_client(settings) as c:  # a new process-equivalent: new app, same index_path
        assert c.get("/v1/index").json()["count"] == expected_count
        found: set[str] = set()
        for shard in range(SHARDS):
            r = c.post("/v1/search", json={"text": "a red circle", "k": 100, "filter": {"shard": shard}})
            assert r.status_code == 200
            hits = r.json()["hits"]
            assert all(h["metadata"] == {"shard": shard} for h in hits)
            found.update(h["id"] for h in hits)
        assert found == set(ids) - deleted
        api_hits = c.post("/v1/search", json={"text": "a red circle", "k": 100, "filter": {"shard": "api"}}).json()
        api_found = {h["id"] for h in api_hits["hits"]}
        r2 = c.post("/v1/search", json={"text": "a red circle", "k": 100,
                                        "filter": {"shard": "api", "i": 149}}).json()["hits"]
        assert [h["id"] for h in r2] == ["api-149"]
        assert len(api_found) == 100
        for item in api_items:
            r = c.get(f"/v1/index/items/{item['id']}")
            if item["id"] in deleted:
                assert r.status_code == 404
            else:
                assert r.json()["metadata"] == item["metadata"]
        seeded = np.asarray(c.get("/v1/index/items/seed-01234", params={"include_vector": True}).json()["vector"])
        np.testing.assert_allclose(seeded, vectors[1234] / np.linalg.norm(vectors[1234]), atol=1e-6)


def test_concurrent_adds_and_searches_through_the_api(client) -> None:
    writers, per_writer, readers = 4, 15, 3
    errors: list[str] = []
    stop = threading.Event()
    search_counts: list[int] = []

    def write(w: int) -> None:
        for i in range(per_writer):
            r = client.post("/v1/index/items", json={"id": f"w{w}-{i}", "text": f"a red circle number {i}",
                                                     "metadata": {"writer": w}})
            if r.status_code != 201:
                errors.append(r.text)

    def read() -> None:
        while not stop.is_set():
            r = client.post("/v1/search", json={"text": "a red circle", "k": 100})
            if r.status_code != 200:
                errors.append(r.text)
            else:
                search_counts.append(len(r.json()["hits"]))

    threads = [threading.Thread(target=read) for _ in range(readers)]
    for t in threads:
        t.start()
    write_threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in write_threads:
        t.start()
    for t in write_threads:
        t.join(timeout=120)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert search_counts and max(search_counts) <= writers * per_writer
    assert client.get("/v1/index").json()["count"] == writers * per_writer
    for w in range(writers):
        hits = client.post("/v1/search", json={"text": "a red circle", "k": 100, "filter": {"writer": w}}).json()
        assert sorted(h["id"] for h in hits["hits"]) == sorted(f"w{w}-{i}" for i in range(per_writer))


def test_index_routes_are_documented(client) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"/v1/index", "/v1/index/items", "/v1/index/items/batch", "/v1/index/items/{item_id}"} <= set(paths)
    add = paths["/v1/index/items"]["post"]
    assert set(add["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"201", "200", "413", "415", "422"} <= set(add["responses"])
    assert "re-normalised" in add["description"]
    batch = paths["/v1/index/items/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert batch["examples"] and "$ref" not in str(batch)
    get = paths["/v1/index/items/{item_id}"]["get"]
    assert any(p["name"] == "include_vector" for p in get["parameters"])


def test_item_vector_is_unit_length(client) -> None:
    client.post("/v1/index/items", json={"id": "u", "text": "a red circle"})
    assert np.linalg.norm(stored_vector(client, "u")) == pytest.approx(1.0, abs=1e-5)


def test_index_path_in_settings_is_where_items_persist(settings) -> None:
    with app_client(settings) as c:
        c.post("/v1/index/items", json={"id": "p", "text": "a red circle"})
    assert (Path(settings.index_path) / "index.json").is_file()
    with app_client(settings) as c:
        assert c.get("/v1/index/items/p").status_code == 200


@pytest.mark.parametrize(("err", "status", "code"), [(28, 507, "insufficient_storage"), (5, 503, "index_write_failed")])
def test_a_write_the_disk_refuses_is_answered_with_its_own_status(client, monkeypatch, err: int, status: int,
                                                                  code: str) -> None:
    import os

    import app.index.wal as wal_module

    def refuse(fd: int, data: object) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(wal_module, "_write_all", refuse)
    r = client.post("/v1/index/items", json={"id": "x", "text": "a red circle"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and "nothing was stored" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert client.get("/v1/index/items/x").status_code == 404
    assert client.post("/v1/index/items", json={"id": "x", "text": "a red circle"}).status_code == 201
