"""API keys: which routes need which key, how keys are read, and how they are compared."""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.auth import Access, KeyConfigError, KeyRing, Role, route_access
from app.main import create_app

READ_KEY = "read-key-0123456789abcdef"
OTHER_READ_KEY = "read-key-fedcba9876543210"
ADMIN_KEY = "admin-key-0123456789abcdef"
OPEN_ROUTES = ["/livez", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"]
ADMIN_OPERATIONS = {("POST", "/v1/index/items"), ("POST", "/v1/index/items/batch"),
                    ("DELETE", "/v1/index/items/{item_id}")}


@contextmanager
def app_client(settings, **update: object) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update=update))) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def operations(c: TestClient) -> list[tuple[str, str, dict]]:
    spec = c.get("/openapi.json").json()
    return [(method.upper(), path, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


def call(c: TestClient, method: str, path: str, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    url = re.sub(r"\{[^}]+\}", "some-id", path)
    if method == "GET":
        return c.get(url, headers=headers)
    return c.request(method, url, json={}, headers=headers)


def test_every_route_in_openapi_answers_401_403_or_passes_by_key_class(settings) -> None:
    with app_client(settings, api_keys=f"{READ_KEY},{OTHER_READ_KEY}", admin_keys=ADMIN_KEY) as c:
        ops = operations(c)
        assert len(ops) >= 12
        admin_ops = {(m, p) for m, p, _ in ops if route_access(p, [m]) is Access.ADMIN}
        assert admin_ops == ADMIN_OPERATIONS
        for method, path, op in ops:
            where = f"{method} {path}"
            if path in OPEN_ROUTES:
                assert "security" not in op, where
                assert call(c, method, path).status_code == 200, where
                continue
            assert op["security"] == [{"BearerKey": []}, {"ApiKeyHeader": []}], where
            anonymous = call(c, method, path)
            assert anonymous.status_code == 401, where
            assert anonymous.headers["www-authenticate"] == "Bearer", where
            assert anonymous.json()["error"]["code"] == "unauthorized", where
            assert call(c, method, path, bearer("not-a-configured-key-123")).status_code == 401, where
            reader = call(c, method, path, bearer(READ_KEY))
            if (method, path) in ADMIN_OPERATIONS:
                assert reader.status_code == 403, where
                assert reader.json()["error"]["code"] == "forbidden", where
                assert "401" in op["responses"] and "403" in op["responses"], where
            else:
                assert reader.status_code not in (401, 403), (where, reader.text)
                assert "401" in op["responses"], where
            admin = call(c, method, path, {"X-API-Key": ADMIN_KEY})
            assert admin.status_code not in (401, 403), (where, admin.text)
        for path in OPEN_ROUTES:
            assert c.get(path).status_code == 200, path


def test_bearer_and_x_api_key_headers_are_both_accepted(settings) -> None:
    with app_client(settings, api_keys=READ_KEY) as c:
        assert c.get("/v1/model", headers=bearer(READ_KEY)).status_code == 200
        assert c.get("/v1/model", headers={"X-API-Key": READ_KEY}).status_code == 200
        assert c.get("/v1/model", headers={"Authorization": f"bearer {READ_KEY}"}).status_code == 200
        # Basic auth, an empty bearer and a key with a different case are not keys.
        assert c.get("/v1/model", headers={"Authorization": f"Basic {READ_KEY}"}).status_code == 401
        assert c.get("/v1/model", headers={"Authorization": "Bearer "}).status_code == 401
        assert c.get("/v1/model", headers=bearer(READ_KEY.upper())).status_code == 401


def test_missing_and_invalid_keys_get_distinct_401_messages(settings) -> None:
    with app_client(settings, api_keys=READ_KEY) as c:
        missing = c.post("/v1/search", json={"text": "a red circle"})
        invalid = c.post("/v1/search", json={"text": "a red circle"}, headers=bearer("wrong-key-0123456789"))
    assert missing.status_code == invalid.status_code == 401
    assert "missing API key" in missing.json()["error"]["message"]
    assert invalid.json()["error"]["message"] == "invalid API key"


def test_admin_key_works_on_read_routes_and_writes_the_index(settings) -> None:
    with app_client(settings, api_keys=READ_KEY, admin_keys=ADMIN_KEY) as c:
        assert c.post("/v1/search", json={"text": "a red circle"}, headers=bearer(ADMIN_KEY)).status_code == 200
        added = c.post("/v1/index/items", json={"id": "doc-1", "text": "a red circle"}, headers=bearer(ADMIN_KEY))
        assert added.status_code == 201, added.text
        denied = c.post("/v1/index/items", json={"id": "doc-2", "text": "a red circle"}, headers=bearer(READ_KEY))
        assert denied.status_code == 403
        assert "admin key" in denied.json()["error"]["message"]
        assert c.get("/v1/index/items/doc-1", headers=bearer(READ_KEY)).status_code == 200
        assert c.get("/v1/index/items/doc-2", headers=bearer(READ_KEY)).status_code == 404
        assert c.delete("/v1/index/items/doc-1", headers=bearer(READ_KEY)).status_code == 403
        assert c.delete("/v1/index/items/doc-1", headers=bearer(ADMIN_KEY)).status_code == 200


def test_admin_keys_only_leave_reads_open_but_protect_writes(settings) -> None:
    with app_client(settings, admin_keys=ADMIN_KEY) as c:
        assert c.post("/v1/search", json={"text": "a red circle"}).status_code == 200
        assert c.get("/v1/model").status_code == 200
        assert c.post("/v1/index/items", json={"id": "x", "text": "a red circle"}).status_code == 401
        assert c.post("/v1/index/items", json={"id": "x", "text": "a red circle"},
                      headers=bearer(ADMIN_KEY)).status_code == 201


def test_read_keys_without_admin_keys_disable_index_writes(settings) -> None:
    with app_client(settings, api_keys=READ_KEY) as c:
        r = c.post("/v1/index/items", json={"id": "x", "text": "a red circle"}, headers=bearer(READ_KEY))
        assert r.status_code == 403
        assert "no admin keys are configured" in r.json()["error"]["message"]
        assert c.post("/v1/index/items", json={"id": "x", "text": "a"}).status_code == 401


def test_keys_file_skips_comments_and_blank_lines(settings, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# team keys\n\n{READ_KEY}\n  {OTHER_READ_KEY}   # ci runner\n# retired-key-0123456789abc\n")
    admin = tmp_path / "admin.txt"
    admin.write_text(f"{ADMIN_KEY}\n")
    with app_client(settings, api_keys_file=keys, admin_keys_file=admin) as c:
        assert c.get("/v1/model", headers=bearer(READ_KEY)).status_code == 200
        assert c.get("/v1/model", headers={"X-API-Key": OTHER_READ_KEY}).status_code == 200
        assert c.get("/v1/model", headers=bearer("retired-key-0123456789abc")).status_code == 401
        assert c.post("/v1/index/items", json={"id": "x", "text": "a"}, headers=bearer(ADMIN_KEY)).status_code == 201


def test_env_and_file_keys_add_up(settings, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{OTHER_READ_KEY}\n")
    with app_client(settings, api_keys=f" {READ_KEY} ,, ", api_keys_file=keys) as c:
        assert c.get("/v1/model", headers=bearer(READ_KEY)).status_code == 200
        assert c.get("/v1/model", headers=bearer(OTHER_READ_KEY)).status_code == 200


def test_a_missing_key_file_stops_the_service_from_starting(settings, tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError, match="cannot read key file"):
        create_app(settings.model_copy(update={"api_keys_file": tmp_path / "nope.txt"}))


def test_a_key_that_cannot_be_sent_in_a_header_is_refused_at_start(settings) -> None:
    with pytest.raises(KeyConfigError, match="visible ASCII"):
        create_app(settings.model_copy(update={"api_keys": "has space-0123456789abc"}))


def test_key_comparison_checks_every_configured_key_on_equal_length_digests(monkeypatch) -> None:
    ring = KeyRing.from_keys(read=[READ_KEY, OTHER_READ_KEY, "read-key-third-000000000"], admin=[ADMIN_KEY])
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for key, role in ((READ_KEY, Role.READ), (ADMIN_KEY, Role.ADMIN), ("x", None), ("y" * 5000, None)):
        compared.clear()
        assert ring.role_of(key) is role
        # No early exit: the first read key matches, yet all four configured keys are compared,
        # and always as 32-byte SHA-256 digests, so neither timing nor length reveals the match.
        assert compared == [(32, 32)] * 4


def test_no_keys_logs_a_warning_that_everything_is_open(settings, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(settings)
    logger = logging.getLogger("mmfusion")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="mmfusion"), TestClient(app) as c:
            assert c.post("/v1/index/items", json={"id": "x", "text": "a red circle"}).status_code == 201
    finally:
        logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("every route is open" in w for w in warnings)


def test_openapi_declares_both_security_schemes_for_the_authorize_button(settings) -> None:
    with app_client(settings, api_keys=READ_KEY) as c:
        schemes = c.get("/openapi.json").json()["components"]["securitySchemes"]
        docs = c.get("/docs")
    assert schemes["BearerKey"] == {**schemes["BearerKey"], "type": "http", "scheme": "bearer"}
    assert schemes["ApiKeyHeader"] == {**schemes["ApiKeyHeader"], "type": "apiKey", "in": "header",
                                       "name": "X-API-Key"}
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
