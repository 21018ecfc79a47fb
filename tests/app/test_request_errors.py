"""Everything a client can get wrong in a request gets the right 4xx in the one error schema.

Payload parsing (multipart and JSON), text handling, the streaming body limit and the mapping of
every error status, through the app; the body limit also through a real uvicorn socket.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from app.core.errors import (
    BadRequestError,
    BundleError,
    ForbiddenError,
    NotFoundError,
    RequestTimeoutError,
    UnauthorizedError,
)
from tests.app.test_uvicorn_process import start_server

LIMIT = 1024 * 1024  # MMFUSION_MAX_UPLOAD_BYTES for this module's app
TEXT = "what color is the circle?"
ERROR_STATUSES = (400, 401, 403, 404, 405, 413, 415, 422, 503, 504)


def png(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buf, "PNG")
    return buf.getvalue()


PNG = png()
PNG_B64 = base64.b64encode(PNG).decode()
LEAK_MARKERS = ("Traceback", 'File "', "/work/", "/tmp/", "site-packages", ".py", "secret")


def assert_error(r: Any, status: int, code: str | None = None, field: str | None = None) -> dict:
    """The response is ``status`` with exactly the error schema, and leaks nothing internal."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) <= {"code", "message", "field"} and {"code", "message"} <= set(err), err
    assert isinstance(err["code"], str) and re.fullmatch(r"[a-z_]+", err["code"]), err
    assert isinstance(err["message"], str) and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    if field is not None:
        assert err.get("field") == field, err
    for marker in LEAK_MARKERS:
        assert marker not in r.text, (marker, r.text)
    assert r.headers.get("x-request-id")
    return err


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "b0undary") -> tuple[bytes, dict]:
    """A hand-built multipart body: (name, data, filename or None) per part."""
    out = bytearray()
    for name, data, filename in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"Content-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), {"content-type": f"multipart/form-data; boundary={boundary}"}


def build_app(tiny_bundle: Path, index: Path, **overrides: Any) -> FastAPI:
    from app.core.config import Settings
    from app.main import create_app

    settings = Settings(bundle=tiny_bundle, index_path=index, intra_op_threads=1, decode_threads=2,
                        max_upload_bytes=LIMIT, **overrides)
    app = create_app(settings)

    # Routes that exist only in the test app, to reach error paths no real route should have.
    @app.get("/test/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail in /work/main/app/secret.py line 3")

    @app.get("/test/boom-sync")
    def boom_sync() -> None:
        raise KeyError("/tmp/secret/path.py")

    @app.get("/test/typed/{status}")
    async def typed(status: int) -> None:
        raise {400: BadRequestError("bad"), 401: UnauthorizedError(), 403: ForbiddenError("no"),
               404: NotFoundError("none"), 504: RequestTimeoutError("too slow")}[status]

    @app.get("/test/bundle-error")
    async def bundle_error() -> None:
        raise BundleError("manifest at /work/secret/manifest.py is corrupt")

    @app.get("/test/needs-int")
    async def needs_int(n: int) -> dict:
        return {"n": n}

    return app


@pytest.fixture(scope="module")
def app_client(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, TestClient]]:
    """One app for the module (a lifespan per test would cost seconds each)."""
    app = build_app(tiny_bundle, tmp_path_factory.mktemp("errors") / "index")
    with TestClient(app) as c:
        yield app, c


@pytest.fixture
def api(app_client: tuple[FastAPI, TestClient]) -> TestClient:
    return app_client[1]


# --------------------------------------------------------------------------------------------------
# Content types and missing, duplicate, unknown fields
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", ["text/plain", "application/xml", "image/png", "application/x-www-form-urlencoded"])
def test_wrong_content_types_are_415(api: TestClient, ctype: str) -> None:
    assert_error(api.post("/v1/classify", content=b"text=hi", headers={"content-type": ctype}),
                 415, "unsupported_media_type")


def test_no_content_type_is_415(api: TestClient) -> None:
    err = assert_error(api.post("/v1/classify", content=b"hello"), 415, "unsupported_media_type")
    assert "(none)" in err["message"]


@pytest.mark.parametrize(("parts", "field"), [
    ([("text", TEXT.encode(), None)], "image"),
    ([("image", PNG, "a.png")], "text"),
])
def test_missing_multipart_fields_are_422_naming_the_field(api: TestClient, parts: list, field: str) -> None:
    body, headers = multipart(parts)
    assert_error(api.post("/v1/classify", content=body, headers=headers), 422, "invalid_field", field)


@pytest.mark.parametrize(("payload", "field"), [
    ({"text": TEXT}, "image_base64"),
    ({"image_base64": PNG_B64}, "text"),
])
def test_missing_json_fields_are_422_naming_the_field(api: TestClient, payload: dict, field: str) -> None:
    assert_error(api.post("/v1/classify", json=payload), 422, "invalid_field", field)


@pytest.mark.parametrize(("parts", "field"), [
    ([("image", PNG, "a.png"), ("text", b"one", None), ("text", b"two", None)], "text"),
    ([("image", PNG, "a.png"), ("image", PNG, "b.png"), ("text", b"x", None)], "image"),
])
def test_duplicate_multipart_fields_are_422(api: TestClient, parts: list, field: str) -> None:
    body, headers = multipart(parts)
    err = assert_error(api.post("/v1/classify", content=body, headers=headers), 422, "invalid_field", field)
    assert "more than once" in err["message"]


def test_duplicate_json_keys_are_422(api: TestClient) -> None:
    raw = f'{{"image_base64": "{PNG_B64}", "text": "a", "text": "b"}}'.encode()
    assert_error(api.post("/v1/classify", content=raw, headers={"content-type": "application/json"}),
                 422, "invalid_field", "text")


def test_unknown_fields_are_422_in_both_encodings(api: TestClient) -> None:
    body, headers = multipart([("image", PNG, "a.png"), ("text", b"hi", None), ("colour", b"red", None)])
    assert_error(api.post("/v1/classify", content=body, headers=headers), 422, "invalid_field", "colour")
    assert_error(api.post("/v1/classify", json={"image_base64": PNG_B64, "text": "hi", "colour": 1}),
                 422, "invalid_field", "colour")


def test_image_sent_as_a_plain_field_and_text_as_a_file_are_422(api: TestClient) -> None:
    body, headers = multipart([("image", PNG, None), ("text", b"hi", None)])
    assert_error(api.post("/v1/classify", content=body, headers=headers), 422, "invalid_field", "image")
    body, headers = multipart([("image", PNG, "a.png"), ("text", b"hi", "t.txt")])
    assert_error(api.post("/v1/classify", content=body, headers=headers), 422, "invalid_field", "text")


@pytest.mark.parametrize("name", ["text", "distinct"])
def test_thousands_of_multipart_parts_are_refused_at_the_first_bad_part(api: TestClient, name: str) -> None:
    parts = [(name if name == "text" else f"f{i}", b"x", None) for i in range(10_000)]
    body, headers = multipart(parts)
    t = time.perf_counter()
    r = api.post("/v1/classify", content=body, headers=headers)
    elapsed = time.perf_counter() - t
    assert_error(r, 422, "invalid_field", "text" if name == "text" else "f0")
    assert elapsed < 3.0, elapsed  # stops at part 2 (measured ~0.03 s), never parses all 10,000


def test_more_parts_than_the_limit_is_413_even_when_every_name_is_new() -> None:
    from app.api.payload import MAX_PARTS, _MultipartReader
    from app.core.errors import PayloadTooLargeError

    reader = _MultipartReader(allowed=None, max_file_bytes=1024)
    with pytest.raises(PayloadTooLargeError, match=f"more than {MAX_PARTS} parts"):
        for _ in range(MAX_PARTS + 1):
            reader.on_part_begin()


# --------------------------------------------------------------------------------------------------
# Malformed multipart
# --------------------------------------------------------------------------------------------------


GOOD_MULTIPART, _ = multipart([("image", PNG, "a.png"), ("text", TEXT.encode(), None)])
MALFORMED = {
    "no-boundary-param": (GOOD_MULTIPART, "multipart/form-data"),
    "empty-boundary": (GOOD_MULTIPART, "multipart/form-data; boundary="),
    "other-boundary": (GOOD_MULTIPART, "multipart/form-data; boundary=somethingelse"),
    "no-closing-boundary": (GOOD_MULTIPART[: GOOD_MULTIPART.rindex(b"--b0undary--")],
                            "multipart/form-data; boundary=b0undary"),
    "empty-body": (b"", "multipart/form-data; boundary=b0undary"),
    "garbage": (b"\x00\x01garbage" * 50, "multipart/form-data; boundary=b0undary"),
    "no-name": (b'--b0undary\r\nContent-Disposition: form-data\r\n\r\nhi\r\n--b0undary--\r\n',
                "multipart/form-data; boundary=b0undary"),
    "no-disposition": (b"--b0undary\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b0undary--\r\n",
                       "multipart/form-data; boundary=b0undary"),
    "bad-header-line": (b'--b0undary\r\nContent-Disposition: form-data; name="text"\r\nno colon here\r\n\r\nhi\r\n'
                        b"--b0undary--\r\n", "multipart/form-data; boundary=b0undary"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_multipart_is_400(api: TestClient, name: str) -> None:
    body, ctype = MALFORMED[name]
    assert_error(api.post("/v1/classify", content=body, headers={"content-type": ctype}), 400, "bad_request")


def test_a_well_formed_multipart_body_still_works(api: TestClient) -> None:
    r = api.post("/v1/classify", content=GOOD_MULTIPART,
                 headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def post_raw_json(api: TestClient, raw: bytes | str, path: str = "/v1/classify") -> Any:
    data = raw.encode() if isinstance(raw, str) else raw
    return api.post(path, content=data, headers={"content-type": "application/json"})


@pytest.mark.parametrize(("value", "why"), [
    ("NaN", "not a valid JSON number"), ("Infinity", "not a valid JSON number"), ("-Infinity", "not a valid"),
    ("1e400", "out of range"), ("-1e400", "out of range"), ("1" * 5000, "too large"),
], ids=["nan", "inf", "-inf", "1e400", "-1e400", "5000-digits"])
def test_json_nan_and_huge_numbers_are_422_naming_the_field(api: TestClient, value: str, why: str) -> None:
    raw = f'{{"image_base64": "{PNG_B64}", "text": "hi", "top_k": {value}}}'
    err = assert_error(post_raw_json(api, raw), 422, "invalid_field", "top_k")
    assert why in err["message"]


@pytest.mark.parametrize(("payload", "field"), [
    ({"image_base64": PNG_B64, "text": 5}, "text"),
    ({"image_base64": PNG_B64, "text": ["a"]}, "text"),
    ({"image_base64": 12, "text": "hi"}, "image_base64"),
    ({"image_base64": PNG_B64, "text": "hi", "top_k": "three"}, "top_k"),
    ({"image_base64": PNG_B64, "text": "hi", "top_k": 1.5}, "top_k"),
    ({"image_base64": PNG_B64, "text": "hi", "top_k": 0}, "top_k"),
])
def test_json_wrong_types_are_422_naming_the_field(api: TestClient, payload: dict, field: str) -> None:
    assert_error(api.post("/v1/classify", json=payload), 422, "invalid_field", field)


@pytest.mark.parametrize(("raw", "name"), [("[1, 2]", "array"), ('"a string"', "string"), ("42", "number"),
                                           ("null", "null")])
def test_json_body_that_is_not_an_object_is_422_naming_the_json_type(api: TestClient, raw: str, name: str) -> None:
    err = assert_error(post_raw_json(api, raw), 422, "invalid_field")
    assert err["message"] == f"body must be a JSON object, not {name}"


@pytest.mark.parametrize("value", [True, "3", 2.5])
def test_json_numbers_are_strict_no_bool_or_string_coercion(api: TestClient, value: object) -> None:
    # Lax validation would read true as top_k=1 and "3" as 3: a client bug answered as if it were meant.
    err = assert_error(api.post("/v1/classify", json={"image_base64": PNG_B64, "text": "hi", "top_k": value}),
                       422, "invalid_field", "top_k")
    assert "valid integer" in err["message"]
    assert_error(api.post("/v1/search", json={"text": "hi", "k": value}), 422, "invalid_field", "k")


def test_an_integer_valued_float_is_still_a_count(api: TestClient) -> None:
    # JavaScript numbers and Java doubles serialise 2 as 2.0.
    r = api.post("/v1/classify", json={"image_base64": PNG_B64, "text": "hi", "top_k": 2.0})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text


@pytest.mark.parametrize(("value", "name"), [(None, "null"), ({"a": 1}, "object"), ([1], "array")])
def test_a_bad_filter_value_names_the_key_and_the_json_type(api: TestClient, value: object, name: str) -> None:
    err = assert_error(api.post("/v1/search", json={"text": "hi", "filter": {"owner": value}}),
                       422, "invalid_field", "filter.owner")
    assert err["message"] == f"filter.owner: a filter value must be a string, number or boolean, not {name}"


def test_compressed_bodies_are_415_not_misread(api: TestClient) -> None:
    import gzip

    body = gzip.compress(json.dumps({"image_base64": PNG_B64, "text": "hi"}).encode())
    err = assert_error(api.post("/v1/classify", content=body, headers={
        "content-type": "application/json", "content-encoding": "gzip"}), 415, "unsupported_media_type")
    assert "Content-Encoding gzip" in err["message"]


def test_json_in_another_charset_is_415(api: TestClient) -> None:
    body = json.dumps({"image_base64": PNG_B64, "text": "café"}, ensure_ascii=False).encode("latin-1")
    err = assert_error(api.post("/v1/classify", content=body, headers={
        "content-type": "application/json; charset=latin-1"}), 415, "unsupported_media_type")
    assert "UTF-8" in err["message"]
    r = api.post("/v1/classify", content=body.decode("latin-1").encode(), headers={
        "content-type": "application/json; charset=UTF-8"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw", [b"", b"   ", b"{not json", b'{"text": "hi",}', b"\xff\xfe{}", "[" * 100_000],
                         ids=["empty", "spaces", "unclosed", "trailing-comma", "not-utf8", "nested-100k-deep"])
def test_malformed_json_is_400(api: TestClient, raw: bytes | str) -> None:
    assert_error(post_raw_json(api, raw), 400, "bad_request")


def test_lone_surrogates_in_json_strings_are_422_not_500(api: TestClient) -> None:
    raw = f'{{"image_base64": "{PNG_B64}", "text": "red \\ud800 circle"}}'
    assert_error(post_raw_json(api, raw), 422, "invalid_field", "text")
    # A valid surrogate *pair* (an emoji) is fine.
    r = post_raw_json(api, f'{{"image_base64": "{PNG_B64}", "text": "red \\ud83d\\ude00 circle"}}')
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("bad", ["not base64!!", "abc", "=" * 8, "aGVsbG8=" + "\x00"])
def test_invalid_base64_is_422_naming_the_field(api: TestClient, bad: str) -> None:
    assert_error(api.post("/v1/classify", json={"image_base64": bad, "text": "hi"}), 422, "invalid_field",
                 "image_base64")


def test_base64_with_line_breaks_or_a_data_url_prefix_is_accepted(api: TestClient) -> None:
    wrapped = "\n".join(PNG_B64[i:i + 76] for i in range(0, len(PNG_B64), 76))
    for value in (wrapped, "data:image/png;base64," + PNG_B64):
        r = api.post("/v1/classify", json={"image_base64": value, "text": TEXT})
        assert r.status_code == 200, r.text


def test_valid_base64_of_a_non_image_is_415(api: TestClient) -> None:
    value = base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode()
    assert_error(api.post("/v1/classify", json={"image_base64": value, "text": "hi"}), 415,
                 "unsupported_media_type", "image_base64")


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def test_invalid_utf8_in_multipart_text_is_422(api: TestClient) -> None:
    body, headers = multipart([("image", PNG, "a.png"), ("text", b"caf\xe9 \xff\xfe", None)])
    err = assert_error(api.post("/v1/classify", content=body, headers=headers), 422, "invalid_field", "text")
    assert "utf-8" in err["message"].lower()


def test_a_declared_latin1_charset_is_honoured(api: TestClient) -> None:
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n".encode()
            + PNG + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n"
            "Content-Type: text/plain; charset=iso-8859-1\r\n\r\n".encode() + "café".encode("latin-1")
            + f"\r\n--{boundary}--\r\n".encode())
    r = api.post("/v1/classify", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200, r.text


def classify_probs(api: TestClient, text: str) -> list[float]:
    r = api.post("/v1/classify", json={"image_base64": PNG_B64, "text": text})
    assert r.status_code == 200, r.text
    return [p["score"] for p in sorted(r.json()["predictions"], key=lambda p: p["label"])]


def test_control_characters_are_stripped_before_the_model(api: TestClient) -> None:
    with_controls = classify_probs(api, "what co\x00lor\x07 is the \x1bcircle?\x7f")
    assert with_controls == classify_probs(api, "what color is the circle?")
    # Tabs and newlines are whitespace, kept.
    assert classify_probs(api, "what\tcolor\nis the circle?") == classify_probs(api, "what color is the circle?")


def test_text_of_only_control_characters_is_422(api: TestClient) -> None:
    assert_error(api.post("/v1/classify", json={"image_base64": PNG_B64, "text": "\x00\x01\x02 \x1b"}),
                 422, "invalid_field", "text")


def test_text_over_the_character_limit_is_413(api: TestClient) -> None:
    assert_error(api.post("/v1/classify", json={"image_base64": PNG_B64, "text": "a" * 10_001}),
                 413, "payload_too_large", "text")


def test_long_text_is_truncated_to_max_length_with_a_flag(api: TestClient, tiny_bundle: Path) -> None:
    from app.bundle.verify import load_bundle_manifest
    from app.preprocessing.text import TextTokenizer

    manifest = load_bundle_manifest(tiny_bundle)
    tok = TextTokenizer(tiny_bundle / manifest.text.tokenizer_file, manifest.text.max_length)
    n = manifest.text.max_length
    enc = tok.encode(["red " * (n + 5), "red " * (n - 1)])
    assert enc.truncated == [True, False]
    assert int(enc.attention_mask[0].sum()) == n and int(enc.attention_mask[1].sum()) < n
    r = api.post("/v1/classify", json={"image_base64": PNG_B64, "text": "what color " * 200})
    assert r.status_code == 200 and r.json()["truncated"] is True
    assert api.post("/v1/classify", json={"image_base64": PNG_B64, "text": TEXT}).json()["truncated"] is False


def test_clean_text_rules() -> None:
    from app.preprocessing.text import clean_text, has_lone_surrogate

    assert clean_text("a\x00b\tc\nd\re\x85f\x7fg") == "ab\tc\nd\refg"
    assert clean_text("zwj\u200dkept") == "zwj\u200dkept"  # format characters are kept
    assert clean_text("x\ud800y") == "x\ufffdy"
    assert has_lone_surrogate("x\udfffy") and not has_lone_surrogate("😀") and not has_lone_surrogate("plain")


# --------------------------------------------------------------------------------------------------
# Request size: declared, streamed (ASGI level, counting what the app pulled) and over a socket
# --------------------------------------------------------------------------------------------------


def test_content_length_over_the_limit_is_413_before_reading(api: TestClient) -> None:
    body, headers = multipart([("image", b"\xff\xd8\xff" + b"\x00" * (LIMIT + 10), "a.jpg"), ("text", b"hi", None)])
    err = assert_error(api.post("/v1/classify", content=body, headers=headers), 413, "payload_too_large")
    assert "MMFUSION_MAX_UPLOAD_BYTES" in err["message"]


async def asgi_post_stream(app: Any, path: str, headers: dict[str, str], prefix: bytes, chunk: bytes,
                           max_chunks: int) -> tuple[int, dict[str, str], bytes, int]:
    """POST ``prefix`` then up to ``max_chunks`` x ``chunk`` without Content-Length; returns the bytes pulled."""
    pulled = 0
    sent = 0
    messages: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled, sent
        if sent >= max_chunks:
            return {"type": "http.request", "body": b"", "more_body": False}
        body = prefix + chunk if sent == 0 else chunk
        sent += 1
        pulled += len(body)
        return {"type": "http.request", "body": body, "more_body": True}

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 5555), "server": ("testserver", 80)}
    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, pulled


@pytest.mark.parametrize("ctype", ["multipart/form-data; boundary=b0undary", "application/json"])
def test_chunked_body_over_the_limit_is_413_after_reading_only_the_limit(app_client, ctype: str) -> None:
    app, client = app_client
    if ctype.startswith("multipart"):  # a well-formed image part whose data never ends
        prefix = b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n\xff\xd8\xff'
    else:  # a JSON string that never ends
        prefix = b'{"text": "hi", "image_base64": "'
    chunk = b"A" * (64 * 1024)
    total_chunks = 1600  # 100 MiB offered
    status, headers, body, pulled = client.portal.call(asgi_post_stream, app, "/v1/classify",
                                                       {"content-type": ctype}, prefix, chunk, total_chunks)
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert "x-request-id" in headers
    assert pulled <= LIMIT + len(prefix) + len(chunk), pulled  # stopped at the limit: 1 MiB of 100 MiB
    metrics = client.get("/metrics").text
    assert re.search(r'mmfusion_errors_total\{code="payload_too_large",status="413"\} [1-9]', metrics)


def test_chunked_upload_over_a_real_socket_gets_413_without_sending_everything(tiny_bundle, tmp_path: Path) -> None:
    """uvicorn + the app: a client streaming 200 MiB chunked is answered 413 after about the limit."""
    proc, url = start_server(tiny_bundle, tmp_path / "index", {"MMFUSION_MAX_UPLOAD_BYTES": str(LIMIT)})
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    response = b""
    try:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: application/json\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (64 * 1024, b" " * (64 * 1024))
            sock.setblocking(False)
            deadline = time.monotonic() + 30
            while sent < 200 * 1024 * 1024 and time.monotonic() < deadline:
                try:
                    response += sock.recv(65536)
                except BlockingIOError:
                    pass
                except ConnectionError:
                    break
                if b"\r\n\r\n" in response:
                    break
                try:
                    sent += sock.send(chunk)
                except BlockingIOError:
                    time.sleep(0.001)
                except (BrokenPipeError, ConnectionResetError):
                    break
            sock.setblocking(True)
            sock.settimeout(10)
            try:
                while b"}}" not in response:
                    data = sock.recv(65536)
                    if not data:
                        break
                    response += data
            except (TimeoutError, ConnectionError):
                pass
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    print(f"client sent {sent / 2**20:.1f} MiB of the 200 MiB before the 413 (limit {LIMIT / 2**20:.0f} MiB)")
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert b'"payload_too_large"' in response
    # The server stopped reading at ~1 MiB; what the client got out before it noticed is socket buffers.
    assert sent < 32 * 1024 * 1024, sent


# --------------------------------------------------------------------------------------------------
# Every error status uses the schema; nothing internal leaks
# --------------------------------------------------------------------------------------------------


def test_a_trailing_slash_is_a_json_404_naming_the_route_not_a_redirect(api: TestClient) -> None:
    r = api.post("/v1/classify/", json={"image_base64": PNG_B64, "text": "hi"}, follow_redirects=False)
    err = assert_error(r, 404, "not_found")
    assert "try /v1/classify" in err["message"]


def test_health_probes_answer_head(api: TestClient) -> None:
    for path in ("/livez", "/readyz"):
        r = api.head(path)
        assert r.status_code == 200, (path, r.status_code)
    paths = api.get("/openapi.json").json()["paths"]
    assert set(paths["/livez"]) == {"get"}  # HEAD is served but not a second documented operation


def test_a_413_from_the_body_limit_is_counted_under_its_route(api: TestClient) -> None:
    from prometheus_client import REGISTRY

    labels = {"method": "POST", "route": "/v1/classify", "status": "413"}
    before = REGISTRY.get_sample_value("mmfusion_requests_total", labels) or 0.0
    body, headers = multipart([("image", b"\xff\xd8\xff" + b"\x00" * (LIMIT + 10), "a.jpg"), ("text", b"hi", None)])
    assert_error(api.post("/v1/classify", content=body, headers=headers), 413, "payload_too_large")
    assert REGISTRY.get_sample_value("mmfusion_requests_total", labels) == before + 1


def test_upload_routes_document_the_504_deadline(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    for path in ("/v1/classify", "/v1/embed", "/v1/search", "/v1/classify/batch"):
        assert "504" in paths[path]["post"]["responses"], path


def test_404_and_405_use_the_schema(api: TestClient) -> None:
    assert_error(api.get("/v1/nope"), 404, "not_found")
    err = assert_error(api.get("/v1/classify"), 405, "method_not_allowed")
    assert err["message"]
    assert "POST" in api.get("/v1/classify").headers.get("allow", "")


@pytest.mark.parametrize(("status", "code"), [(400, "bad_request"), (401, "unauthorized"), (403, "forbidden"),
                                              (404, "not_found"), (504, "timeout")])
def test_typed_errors_map_to_their_status(api: TestClient, status: int, code: str) -> None:
    r = api.get(f"/test/typed/{status}")
    assert_error(r, status, code)
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def test_query_validation_is_422_with_the_field(api: TestClient) -> None:
    assert_error(api.get("/test/needs-int", params={"n": "x"}), 422, "invalid_field", "n")
    assert_error(api.get("/test/needs-int"), 422, "invalid_field", "n")


@pytest.mark.parametrize("path", ["/test/boom", "/test/boom-sync", "/test/bundle-error"])
def test_unexpected_exceptions_are_500_without_internals(api: TestClient, path: str) -> None:
    r = api.get(path, headers={"X-Request-ID": "trace-me-42"})
    err = assert_error(r, 500, None)
    assert "X-Request-ID" in err["message"]
    assert r.headers["x-request-id"] == "trace-me-42"


def test_503_before_the_model_is_loaded(tiny_bundle: Path, tmp_path: Path) -> None:
    app = build_app(tiny_bundle, tmp_path / "index")
    client = TestClient(app)  # no `with`: the lifespan has not run, the model is not loaded
    r = client.post("/v1/classify", json={"image_base64": PNG_B64, "text": "hi"})
    assert_error(r, 503, "not_ready")
    assert int(r.headers["retry-after"]) >= 1
    assert_error(client.get("/readyz"), 503, "not_ready")


def test_401_and_403_from_api_keys(tiny_bundle: Path, tmp_path: Path) -> None:
    app = build_app(tiny_bundle, tmp_path / "index", api_keys="read-key-0123456789",
                    admin_keys="admin-key-0123456789")
    with TestClient(app) as client:
        assert_error(client.post("/v1/classify", json={"image_base64": PNG_B64, "text": "hi"}), 401, "unauthorized")
        assert_error(client.post("/v1/classify", json={"image_base64": PNG_B64, "text": "hi"},
                                 headers={"Authorization": "Bearer wrong-key-0123456789"}), 401, "unauthorized")
        r = client.delete("/v1/index/items/x", headers={"Authorization": "Bearer read-key-0123456789"})
        assert_error(r, 403, "forbidden")


def test_every_required_status_was_produced_in_the_schema(api: TestClient) -> None:
    """A summary check: one request per status, all in the schema."""
    body, headers = multipart([("text", b"x", None), ("text", b"y", None)])
    requests = {
        400: lambda: post_raw_json(api, b"{oops"),
        401: lambda: api.get("/test/typed/401"),
        403: lambda: api.get("/test/typed/403"),
        404: lambda: api.get("/nowhere"),
        405: lambda: api.put("/v1/classify"),
        413: lambda: api.post("/v1/classify", json={"image_base64": PNG_B64, "text": "a" * 20_000}),
        415: lambda: api.post("/v1/classify", content=b"x", headers={"content-type": "text/csv"}),
        422: lambda: api.post("/v1/classify", content=body, headers=headers),
        504: lambda: api.get("/test/typed/504"),
    }
    for status, call in requests.items():
        assert_error(call(), status)
    assert set(requests) | {503} == set(ERROR_STATUSES)  # 503 has its own test (needs an unloaded app)


def test_json_in_a_form_field_is_strict_and_names_the_field() -> None:
    from app.api.payload import parse_json_field
    from app.core.errors import InvalidFieldError

    assert parse_json_field('{"colour": "red", "n": 3}', "filter") == {"colour": "red", "n": 3}
    cases = {'{"a": ' + "1" * 5000 + "}": "filter.a", "[" * 100_000: "filter", '{"a": NaN}': "filter.a",
             '{"a": 1, "a": 2}': "filter.a", "{oops": "filter", '{"a": "\\ud800"}': "filter.a"}
    for raw, field in cases.items():
        with pytest.raises(InvalidFieldError) as err:
            parse_json_field(raw, "filter")
        assert err.value.field == field, (raw[:20], err.value.field)
        assert err.value.message.startswith("filter is not valid JSON"), err.value.message


@pytest.mark.parametrize("value", [" 5", "5 ", "1_0", "\u0665", "+5", "0x5", "5.0"])
def test_form_integers_are_plain_ascii_digits_like_json_numbers(api: TestClient, value: str) -> None:
    def form(**fields: str) -> dict:  # multipart form fields, no file
        return {name: (None, text) for name, text in fields.items()}

    assert_error(api.post("/v1/search", files=form(text="hi", k=value)), 422, "invalid_field", "k")
    assert_error(api.post("/v1/classify", files={"image": ("x.png", base64.b64decode(PNG_B64), "image/png")},
                          data={"text": "hi", "top_k": value}), 422, "invalid_field", "top_k")
    assert api.post("/v1/search", files=form(text="hi", k="5")).status_code == 200
