"""The generated hostile corpus (``tests/hostile/corpus.py``) against the real app, every endpoint.

Per request: a 4xx (never a 5xx) in the one error schema, no stack trace or internal path in the body,
and the process's RSS within a bound. Every few requests, and at the end, a normal request must still
get the same answer as before the corpus started. The counts (inputs per endpoint, statuses) are
printed so the CI log shows what was tried.
"""

from __future__ import annotations

import io
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from tests.hostile.corpus import ADMIN_KEY, AUTH_OVERRIDE, READ_KEY, Case, build_corpus

MIN_CASES = 200
# RSS may grow by at most this much over the whole corpus (it holds 10 MB bodies, 5 MB bombs and
# 100,000-deep JSON); a leak of even 100 KB per request would exceed it.
RSS_BOUND_MB = 100
CHECK_EVERY = 10
ERROR_KEYS = {"code", "message", "field"}


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def leak_markers(settings: Any) -> tuple[str, ...]:
    """Strings no response may contain: tracebacks, source files and this test's private directories."""
    return ("Traceback", 'File "', '.py"', "site-packages", "/work/", str(settings.index_path),
            str(Path(settings.index_path).parent), str(settings.bundle))


def assert_error_schema(err: object, where: str) -> None:
    assert isinstance(err, dict), where
    assert {"code", "message"} <= set(err) <= ERROR_KEYS, (where, err)
    assert isinstance(err["code"], str) and re.fullmatch(r"[a-z_]+", err["code"]), (where, err)
    assert isinstance(err["message"], str) and err["message"], (where, err)


@pytest.fixture
def hostile_client(settings) -> Iterator[tuple[TestClient, Any]]:
    hardened = settings.model_copy(update={"api_keys": READ_KEY, "admin_keys": ADMIN_KEY})
    with TestClient(create_app(hardened)) as c:
        yield c, hardened


def normal_answers(c: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    """What the service answers to well-formed requests: the reference the corpus must not change."""
    classify = c.post("/v1/classify", headers=headers, files={"image": ("ok.png", png((200, 30, 30)), "image/png")},
                      data={"text": "what color is the circle?"})
    search = c.post("/v1/search", headers=headers, json={"text": "a red circle", "k": 2})
    assert classify.status_code == 200, classify.text
    assert search.status_code == 200, search.text
    return {"classify": [(p["label"], round(p["score"], 5)) for p in classify.json()["predictions"]],
            "search": [h["id"] for h in search.json()["hits"]]}


def send(c: TestClient, case: Case) -> Any:
    headers = dict(case.headers)
    if not headers.pop(AUTH_OVERRIDE, None):
        headers["authorization"] = f"Bearer {ADMIN_KEY}"
    return c.request(case.method, case.url, content=case.body or None, headers=headers)


def check_response(case: Case, r: Any, markers: tuple[str, ...]) -> None:
    where = f"{case.endpoint} {case.name}: {r.status_code} {r.text[:300]}"
    assert r.status_code < 500, where
    assert r.headers["content-type"].startswith("application/json"), where
    for marker in markers:
        assert marker not in r.text, (marker, where)
    body = r.json()
    if case.expect == "reject":
        assert 400 <= r.status_code < 500, where
        assert set(body) == {"error"}, where
        assert_error_schema(body["error"], where)
        return
    assert r.status_code == 200, where
    results = body["results"]
    assert results, where
    for result in results:
        assert 400 <= result["status"] < 500, (where, result)
        assert_error_schema(result["error"], where)
    assert body.get("succeeded", body.get("added", 0)) == 0, where


def test_every_hostile_input_gets_a_4xx_in_the_error_schema_and_the_service_stays_correct(
        hostile_client: tuple[TestClient, Any], capsys: pytest.CaptureFixture[str]) -> None:
    c, settings = hostile_client
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    for item_id, text in (("red-1", "a large red circle"), ("blue-1", "a small blue square")):
        assert c.post("/v1/index/items", headers=admin, json={"id": item_id, "text": text}).status_code == 201
    reference = normal_answers(c, admin)
    count_before = c.get("/v1/index", headers=admin).json()
    cases = build_corpus(png((30, 200, 30)))
    assert len(cases) >= MIN_CASES
    markers = leak_markers(settings)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak = rss0
    per_endpoint: dict[str, Counter[int]] = defaultdict(Counter)
    for i, case in enumerate(cases, 1):
        r = send(c, case)
        per_endpoint[case.endpoint][r.status_code] += 1
        check_response(case, r, markers)
        peak = max(peak, proc.memory_info().rss)
        assert peak - rss0 < RSS_BOUND_MB * 2**20, (case.name, (peak - rss0) / 2**20)
        if i % CHECK_EVERY == 0:
            assert normal_answers(c, admin) == reference, f"after {case.endpoint} {case.name}"
    assert normal_answers(c, admin) == reference
    # Nothing hostile was stored, and the items that were there are intact.
    assert c.get("/v1/index", headers=admin).json() == count_before
    growth_mb = (proc.memory_info().rss - rss0) / 2**20
    with capsys.disabled():
        total = Counter[int]()
        print(f"\nhostile corpus: {len(cases)} requests over {len(per_endpoint)} endpoints; "
              f"RSS growth {growth_mb:.1f} MB (peak +{(peak - rss0) / 2**20:.1f} MB, bound {RSS_BOUND_MB} MB)")
        for endpoint, statuses in sorted(per_endpoint.items()):
            total.update(statuses)
            print(f"  {endpoint:<36} {sum(statuses.values()):>4} tried  " +
                  " ".join(f"{s}x{n}" for s, n in sorted(statuses.items())))
        summary = " ".join(f"{s}x{n}" for s, n in sorted(total.items()))
        print(f"  {'all':<36} {sum(total.values()):>4} tried  {summary}")
    assert not any(s >= 500 for s in total)


def test_the_corpus_is_seeded_and_covers_every_endpoint_of_the_openapi_spec(hostile_client) -> None:
    c, _ = hostile_client
    first, second = build_corpus(png((1, 2, 3))), build_corpus(png((1, 2, 3)))
    assert [(x.name, x.url, x.body) for x in first] == [(x.name, x.url, x.body) for x in second]
    spec = c.get("/openapi.json").json()
    operations = {f"{m.upper()} {p}" for p, ops in spec["paths"].items() for m in ops}
    targeted = {x.endpoint for x in first}
    uncovered = {op for op in operations if op.split(" ", 1)[1].startswith(("/v1", "/livez", "/readyz", "/metrics"))}
    assert uncovered - targeted == set()
