"""A seeded, generated corpus of malformed and adversarial HTTP requests, for every endpoint.

Nothing is read from disk: every hostile file is built here from a seed, so a failure reproduces
exactly and the corpus grows by editing code, not by committing binaries. Each :class:`Case` is one
request (method, URL, raw body, headers) plus what a robust server must answer:

* ``reject``: a 4xx in the one error schema (the request as a whole is refused);
* ``item_errors``: the batch endpoints validate items one by one, so a batch whose items are all
  hostile is a 200 whose every result carries a 4xx ``status`` and an error in the same schema.

The kinds follow issue 6: truncated/corrupt JPEG/PNG/WebP/GIF, headers claiming 50,000 x 50,000
pixels, compression bombs, 0-byte files, polyglots, SVG/HTML/PDF renamed ``.jpg``, wrong and missing
content types, multipart with thousands of parts, duplicate and missing fields, invalid UTF-8 and
control characters, 10 MB of text, NaN/huge numbers, wrong JSON types, path-traversal and over-long
ids, metadata that is not JSON.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

Expect = Literal["reject", "item_errors"]
SEED = 20261129
TEN_MB = 10 * 1024 * 1024
READ_KEY = "hostile-read-key-0123456789"
ADMIN_KEY = "hostile-admin-key-0123456789"
# A header the test strips before sending: the case's own auth headers replace the admin key.
AUTH_OVERRIDE = "x-test-own-auth"


@dataclass(frozen=True)
class Case:
    """One hostile request. ``endpoint`` is the OpenAPI operation it targets, for the printed counts."""

    name: str
    endpoint: str
    method: str
    url: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    expect: Expect = "reject"


# --------------------------------------------------------------------------------------------------
# Hostile files
# --------------------------------------------------------------------------------------------------


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def valid_images(rng: random.Random) -> dict[str, bytes]:
    """Small real images (noise, so the compressed data is not trivial) in the four web formats."""
    noise = bytes(rng.getrandbits(8) for _ in range(48 * 40 * 3))
    img = Image.frombytes("RGB", (48, 40), noise)
    return {"JPEG": _save(img, "JPEG", quality=85), "PNG": _save(img, "PNG"),
            "WEBP": _save(img, "WEBP", quality=80), "GIF": _save(img.convert("P"), "GIF")}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, idat: bytes = b"", bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG whose IHDR says ``width`` x ``height``, with ``idat`` as its (possibly bogus) data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def png_bomb(side: int) -> bytes:
    """A real decompression bomb: ``side`` x ``side`` 1-bit pixels, all zero, deflated to a few KB."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    out = bytearray()
    for _ in range(side):
        out += comp.compress(row)
    out += comp.flush()
    return png_claiming(side, side, bytes(out), bit_depth=1, colour=0)


def jpeg_claiming(width: int, height: int, base: bytes) -> bytes:
    """``base`` (a real JPEG) with its start-of-frame size rewritten."""
    data = bytearray(base)
    i = 2
    while i + 9 < len(data):
        marker, length = data[i + 1], struct.unpack_from(">H", data, i + 2)[0]
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", data, i + 5, height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker in the base JPEG")


def gif_claiming(width: int, height: int, base: bytes) -> bytes:
    """``base`` (a real GIF) with the logical screen and first image descriptor resized."""
    data = bytearray(base)
    struct.pack_into("<HH", data, 6, width, height)
    pos = data.find(b"\x2c", 13)  # image descriptor
    if pos > 0:
        struct.pack_into("<HH", data, pos + 5, width, height)
    return bytes(data)


def webp_vp8x_claiming(width: int, height: int) -> bytes:
    """An extended WebP header (VP8X) claiming ``width`` x ``height`` and no image data."""
    vp8x = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def pillow_refuses(data: bytes) -> bool:
    """True when Pillow cannot decode ``data``: a random byte flip may land where a decoder does not care
    (JPEG is very tolerant), and a file that still decodes is a valid image, not a hostile one."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception:
        return True
    return False


def corruptions(name: str, data: bytes, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """Truncations and byte flips of a valid file that keep its magic bytes (so the decoder runs)."""
    n = len(data)
    for frac in (0.05, 0.3, 0.6, 0.9):
        yield f"{name}-truncated-{int(frac * 100)}pct", data[: max(16, int(n * frac))]
    kept = 0
    for _ in range(200):  # seeded, so the same candidates are kept every run
        buf = bytearray(data)
        start = 12 + rng.randrange(0, max(1, min(64, n - 13)))
        for j in range(start, min(n, start + 24)):
            buf[j] = rng.getrandbits(8)
        if pillow_refuses(bytes(buf)):
            yield f"{name}-header-garbled-{kept}", bytes(buf)
            kept += 1
            if kept == 3:
                break
    buf = bytearray(data[:16]) + bytes(rng.getrandbits(8) for _ in range(n - 16))
    yield f"{name}-random-after-magic", bytes(buf)


def hostile_files(rng: random.Random) -> list[tuple[str, bytes]]:
    """Every hostile "image" file, each one a client error (413, 415 or 422) whatever the endpoint."""
    good = valid_images(rng)
    files: list[tuple[str, bytes]] = [("empty-0-bytes", b"")]
    for fmt, data in good.items():
        files += list(corruptions(fmt.lower(), data, rng))
    files += [
        ("png-claims-50000x50000", png_claiming(50_000, 50_000, zlib.compress(b"\x00" * 64))),
        ("jpeg-claims-50000x50000", jpeg_claiming(50_000, 50_000, good["JPEG"])),
        ("gif-claims-50000x50000", gif_claiming(50_000, 50_000, good["GIF"])),
        ("webp-claims-16384x16384", webp_vp8x_claiming(16_384, 16_384)),
        ("png-claims-2^31-wide", png_claiming(2**31 - 1, 1)),
        ("png-claims-0x0", png_claiming(0, 0)),
        ("png-bomb-8000x8000-1bit", png_bomb(8000)),
        ("gzip-bomb-not-an-image", _gzip_bomb()),
        ("zlib-stream-not-an-image", zlib.compress(b"\x00" * 2_000_000, 9)),
        ("svg-renamed-jpg", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="50000" '
                            b'height="50000"><script>alert(1)</script></svg>'),
        ("html-renamed-jpg", b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>"),
        ("pdf-renamed-jpg", b"%PDF-1.7\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"),
        ("tiff-not-accepted", _save(Image.new("RGB", (8, 8)), "TIFF")),
        ("ico-not-accepted", _save(Image.new("RGB", (16, 16)), "ICO")),
        ("polyglot-gif-javascript", b"GIF89a/*\x00\x00\x00\x00*/=alert(document.domain);//" + b"\x00" * 32),
        ("polyglot-png-magic-html", b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>"),
        ("polyglot-jpeg-magic-pdf", b"\xff\xd8\xff\xe0%PDF-1.7\n" + b"A" * 200),
        ("polyglot-bmp-text", b"BM" + b"this starts like a bitmap but is text " * 4),
        ("bmp-claims-huge", b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
         + struct.pack("<IiiHHIIiiII", 40, 50_000, 50_000, 1, 24, 0, 0, 0, 0, 0, 0)),
        ("random-bytes-4k", bytes(rng.getrandbits(8) for _ in range(4096))),
        ("nul-bytes-1k", b"\x00" * 1024),
        ("just-the-jpeg-magic", b"\xff\xd8\xff"),
        ("just-the-png-magic", b"\x89PNG\r\n\x1a\n"),
    ]
    return files


def _gzip_bomb() -> bytes:
    import gzip

    return gzip.compress(b"\x00" * 5_000_000, 9, mtime=0)


# --------------------------------------------------------------------------------------------------
# Request builders
# --------------------------------------------------------------------------------------------------


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "h0stile-b0undary",
              part_type: str | None = None) -> tuple[bytes, dict[str, str]]:
    """A hand-built multipart body: (name, data, filename or None) per part."""
    out = bytearray()
    for name, data, filename in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if part_type:
            out += f"Content-Type: {part_type}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), {"content-type": f"multipart/form-data; boundary={boundary}"}


def as_json(doc: object) -> tuple[bytes, dict[str, str]]:
    return json.dumps(doc).encode(), {"content-type": "application/json"}


def raw_json(text: str | bytes) -> tuple[bytes, dict[str, str]]:
    return (text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text,
            {"content-type": "application/json"})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Endpoint: (method, url, the text field needed beside an image, the multipart fields it takes).
IMAGE_ENDPOINTS = {
    "POST /v1/classify": ("/v1/classify", {"text": "what color is the circle?"}),
    "POST /v1/embed": ("/v1/embed", {}),
    "POST /v1/search": ("/v1/search", {}),
    "POST /v1/index/items": ("/v1/index/items", {"id": "hostile-item"}),
}
BATCH_ENDPOINTS = {
    "POST /v1/classify/batch": ("/v1/classify/batch", {"text": "what color is the circle?"}),
    "POST /v1/index/items/batch": ("/v1/index/items/batch", {}),
}


def build_corpus(good_png: bytes, seed: int = SEED) -> list[Case]:
    """The whole corpus. ``good_png`` is a valid image used where a case needs one valid field."""
    rng = random.Random(seed)
    cases: list[Case] = []
    files = hostile_files(rng)

    # 1. Every hostile file, as a multipart upload and as base64 JSON, to every image endpoint.
    for endpoint, (url, extra) in IMAGE_ENDPOINTS.items():
        for i, (fname, data) in enumerate(files):
            if i % 2 == 0:
                fields = [(k, v.encode(), None) for k, v in extra.items()]
                body, headers = multipart([("image", data, "upload.jpg"), *fields], part_type="image/jpeg")
                cases.append(Case(f"{fname}-multipart", endpoint, "POST", url, body, headers))
            else:
                body, headers = as_json({"image_base64": b64(data), **extra})
                cases.append(Case(f"{fname}-json", endpoint, "POST", url, body, headers))
    # Each batch endpoint gets every hostile file once, as items of one batch (answered per item).
    for endpoint, (url, extra) in BATCH_ENDPOINTS.items():
        for start in range(0, len(files), 8):
            chunk = files[start:start + 8]
            items = [{"image_base64": b64(data) or "AA==", **extra,
                      **({"id": f"bad-{start + j}"} if "index" in url else {})} for j, (_, data) in enumerate(chunk)]
            body, headers = as_json({"items": items})
            cases.append(Case(f"hostile-files-{start}-{start + len(chunk) - 1}", endpoint, "POST", url, body, headers,
                              expect="item_errors"))

    # 2. Content types, framing and body structure, for every POST endpoint.
    text_doc = {"text": "a red circle"}
    post_endpoints = {**{k: v[0] for k, v in IMAGE_ENDPOINTS.items()}, **{k: v[0] for k, v in BATCH_ENDPOINTS.items()}}
    for endpoint, url in post_endpoints.items():
        body = json.dumps(text_doc).encode()
        many, many_headers = multipart([(f"f{i}", b"x", None) for i in range(5000)])
        dup, dup_headers = multipart([("text", b"one", None), ("text", b"two", None)])
        cases += [
            Case("no-content-type", endpoint, "POST", url, body, {}),
            Case("content-type-text-plain", endpoint, "POST", url, body, {"content-type": "text/plain"}),
            Case("content-type-xml", endpoint, "POST", url, b"<a>1</a>", {"content-type": "application/xml"}),
            Case("content-type-urlencoded", endpoint, "POST", url, b"text=a+red+circle",
                 {"content-type": "application/x-www-form-urlencoded"}),
            Case("content-type-image-jpeg-raw-body", endpoint, "POST", url, good_png, {"content-type": "image/jpeg"}),
            Case("content-type-garbage", endpoint, "POST", url, body, {"content-type": ";;;==\x7f"}),
            Case("multipart-without-boundary", endpoint, "POST", url, body, {"content-type": "multipart/form-data"}),
            Case("multipart-boundary-300-chars", endpoint, "POST", url, body,
                 {"content-type": "multipart/form-data; boundary=" + "b" * 300}),
            Case("json-body-sent-as-multipart", endpoint, "POST", url, body,
                 {"content-type": "multipart/form-data; boundary=xyz"}),
            Case("multipart-5000-parts", endpoint, "POST", url, many, many_headers),
            Case("multipart-duplicate-field", endpoint, "POST", url, dup, dup_headers),
            Case("multipart-truncated", endpoint, "POST", url, dup[: len(dup) // 2], dup_headers),
            Case("empty-body", endpoint, "POST", url, b"", {"content-type": "application/json"}),
            Case("json-truncated", endpoint, "POST", url, b'{"text": "a red', {"content-type": "application/json"}),
            Case("json-invalid-utf8", endpoint, "POST", url, b'{"text": "\xff\xfe\xc3("}',
                 {"content-type": "application/json"}),
            Case("json-array-body", endpoint, "POST", url, *as_json([text_doc])),
            Case("json-string-body", endpoint, "POST", url, *as_json("a red circle")),
            Case("json-null-body", endpoint, "POST", url, *as_json(None)),
            Case("json-nested-100000", endpoint, "POST", url, *raw_json("[" * 100_000 + "]" * 100_000)),
            Case("json-duplicate-keys", endpoint, "POST", url, *raw_json('{"text": "a", "text": "b"}')),
            Case("json-lone-surrogate", endpoint, "POST", url, *raw_json('{"text": "a \\ud800 b"}')),
            Case("json-10MB-text", endpoint, "POST", url, *as_json({"text": "A" * TEN_MB})),
        ]
        if endpoint not in BATCH_ENDPOINTS:
            big, big_headers = multipart([("text", b"A" * TEN_MB, None)])
            cases.append(Case("multipart-10MB-text-field", endpoint, "POST", url, big, big_headers))
            bad_utf8, bad_headers = multipart([("text", b"caf\xe9 \xff\xfe", None)])
            cases.append(Case("multipart-invalid-utf8-text", endpoint, "POST", url, bad_utf8, bad_headers))
            ctrl, ctrl_headers = multipart([("text", bytes(range(1, 32)) + b"\x7f", None)])
            cases.append(Case("multipart-control-chars-only-text", endpoint, "POST", url, ctrl, ctrl_headers))
            charset, charset_headers = multipart([("text", b"abc", None)], part_type="text/plain; charset=x-klingon")
            cases.append(Case("multipart-unknown-charset", endpoint, "POST", url, charset, charset_headers))
            image_as_field, iaf_headers = multipart([("image", good_png, None)])
            cases.append(Case("multipart-image-not-a-file", endpoint, "POST", url, image_as_field, iaf_headers))

    # 3. Field-level hostility per endpoint (JSON).
    png64 = b64(good_png)
    control_only = "".join(chr(c) for c in range(1, 32)) + "\x7f\u200b\u2028"
    field_cases: dict[str, list[tuple[str, object]]] = {
        "POST /v1/classify": [
            ("missing-image", {"text": "q"}),
            ("missing-text", {"image_base64": png64}),
            ("missing-everything", {}),
            ("text-is-number", {"image_base64": png64, "text": 123}),
            ("text-is-list", {"image_base64": png64, "text": ["a"]}),
            ("text-control-only", {"image_base64": png64, "text": control_only}),
            ("image-is-object", {"image_base64": {"a": 1}, "text": "q"}),
            ("image-not-base64", {"image_base64": "!!!not base64!!!", "text": "q"}),
            ("top-k-zero", {"image_base64": png64, "text": "q", "top_k": 0}),
            ("top-k-negative", {"image_base64": png64, "text": "q", "top_k": -5}),
            ("top-k-string", {"image_base64": png64, "text": "q", "top_k": "three"}),
            ("top-k-float", {"image_base64": png64, "text": "q", "top_k": 2.5}),
            ("unknown-field", {"image_base64": png64, "text": "q", "url": "http://169.254.169.254/"}),
        ],
        "POST /v1/embed": [
            ("nothing-to-embed", {}),
            ("text-is-object", {"text": {"a": 1}}),
            ("text-control-only", {"text": control_only}),
            ("image-url-instead-of-bytes", {"image_url": "http://169.254.169.254/latest/meta-data/"}),
            ("image-file-path", {"image_path": "/etc/passwd"}),
            ("image-empty-string", {"image_base64": ""}),
        ],
        "POST /v1/search": [
            ("nothing-to-search", {}),
            ("k-zero", {"text": "q", "k": 0}),
            ("k-huge-int", {"text": "q", "k": 10**60}),
            ("k-negative", {"text": "q", "k": -1}),
            ("k-string", {"text": "q", "k": "ten"}),
            ("k-list", {"text": "q", "k": [1]}),
            ("filter-list", {"text": "q", "filter": [1, 2]}),
            ("filter-nested", {"text": "q", "filter": {"a": {"b": 1}}}),
            ("filter-null-value", {"text": "q", "filter": {"a": None}}),
            ("filter-string", {"text": "q", "filter": "color=red"}),
        ],
        "POST /v1/index/items": [
            ("missing-id", {"text": "q"}),
            ("id-path-traversal", {"id": "../../etc/passwd", "text": "q"}),
            ("id-absolute-path", {"id": "/etc/passwd", "text": "q"}),
            ("id-backslash-traversal", {"id": "..\\..\\windows\\system32", "text": "q"}),
            ("id-300-chars", {"id": "a" * 300, "text": "q"}),
            ("id-100k-chars", {"id": "b" * 100_000, "text": "q"}),
            ("id-empty", {"id": "", "text": "q"}),
            ("id-nul", {"id": "a\x00b", "text": "q"}),
            ("id-newline-log-injection", {"id": "ok\nINFO forged log line", "text": "q"}),
            ("id-unicode", {"id": "caf\u00e9-\u202e", "text": "q"}),
            ("id-is-number", {"id": 42, "text": "q"}),
            ("id-is-list", {"id": ["a"], "text": "q"}),
            ("metadata-list", {"id": "m1", "text": "q", "metadata": [1, 2]}),
            ("metadata-string", {"id": "m2", "text": "q", "metadata": "{not json"}),
            ("metadata-number", {"id": "m3", "text": "q", "metadata": 7}),
            ("metadata-reserved-key", {"id": "m4", "text": "q",
                                       "metadata": {"_source": {"image_path": "/etc/passwd"}}}),
            ("metadata-2MB", {"id": "m5", "text": "q", "metadata": {"blob": "x" * 2_000_000}}),
            ("metadata-deep", {"id": "m6", "text": "q", "metadata": _deep(200)}),
            ("nothing-to-embed", {"id": "m7"}),
        ],
        "POST /v1/classify/batch": [
            ("items-missing", {}),
            ("items-empty", {"items": []}),
            ("items-string", {"items": "x"}),
            ("items-object", {"items": {"a": 1}}),
            ("items-too-many", {"items": [{"image_base64": png64, "text": "q"}] * 65}),
        ],
        "POST /v1/index/items/batch": [
            ("items-missing", {}),
            ("items-empty", {"items": []}),
            ("items-null", {"items": None}),
            ("items-too-many", {"items": [{"id": f"i{i}", "text": "q"} for i in range(65)]}),
        ],
    }
    for endpoint, entries in field_cases.items():
        url = post_endpoints[endpoint]
        for name, doc in entries:
            cases.append(Case(name, endpoint, "POST", url, *as_json(doc)))
    # Raw JSON numbers the json module would never write: NaN, Infinity, overflowing and 5000-digit numbers.
    for endpoint, template in (("POST /v1/classify", '{"image_base64": "' + png64 + '", "text": "q", "top_k": @N@}'),
                               ("POST /v1/search", '{"text": "q", "k": @N@}'),
                               ("POST /v1/index/items", '{"id": "n1", "text": "q", "metadata": {"x": @N@}}')):
        for label, number in (("nan", "NaN"), ("infinity", "Infinity"), ("neg-infinity", "-Infinity"),
                              ("1e400", "1e400"), ("5000-digits", "9" * 5000)):
            cases.append(Case(f"number-{label}", endpoint, "POST", post_endpoints[endpoint],
                              *raw_json(template.replace("@N@", number))))
    # Items that are each hostile in a different way (all answered per item).
    cases.append(Case("items-all-bad", "POST /v1/classify/batch", "POST", "/v1/classify/batch", *as_json({"items": [
        {"image_base64": png64, "text": control_only}, {"image_base64": "%%%", "text": "q"},
        {"image_base64": png64, "text": "q", "top_k": -1}, {"image_base64": png64}, {"text": "q"}, 7, None, "x"]}),
        expect="item_errors"))
    cases.append(Case("items-all-bad", "POST /v1/index/items/batch", "POST", "/v1/index/items/batch", *as_json({
        "items": [{"id": "../x", "text": "q"}, {"id": "a" * 300, "text": "q"}, {"id": "ok1"},
                  {"id": "ok2", "text": "q", "metadata": "not json"}, {"id": "ok3", "image_base64": "@@@"}, 7, None]}),
        expect="item_errors"))

    # 4. Ids in the URL, GET and DELETE.
    for method in ("GET", "DELETE"):
        endpoint = f"{method} /v1/index/items/{{item_id}}"
        for name, path in (("path-traversal-encoded", "..%2F..%2Fetc%2Fpasswd"),
                           ("path-traversal-raw", "../../etc/passwd"),
                           ("path-traversal-double-encoded", "%252e%252e%252fetc%252fpasswd"),
                           ("slash-in-id", "a/b/c"),
                           ("id-300-chars", "x" * 300),
                           ("id-4000-chars", "y" * 4000),
                           ("id-nul", "a%00b"),
                           ("id-unicode", "%E2%80%AEevil"),
                           ("id-invalid-utf8", "%FF%FE"),
                           ("id-spaces", "a%20b"),
                           ("missing-id", "no-such-item-anywhere")):
            cases.append(Case(name, endpoint, method, f"/v1/index/items/{path}"))
        cases.append(Case("include-vector-not-bool", endpoint, method, "/v1/index/items/a?include_vector=maybe")
                     if method == "GET" else Case("body-on-delete", endpoint, method, "/v1/index/items/../x",
                                                  *as_json({"id": "x"})))

    # 5. Methods, unknown routes and GET endpoints.
    for method, url, endpoint in (("PUT", "/v1/classify", "POST /v1/classify"),
                                  ("PATCH", "/v1/index/items/a", "GET /v1/index/items/{item_id}"),
                                  ("DELETE", "/v1/index", "GET /v1/index"),
                                  ("POST", "/v1/model", "GET /v1/model"),
                                  ("POST", "/livez", "GET /livez"),
                                  ("PUT", "/readyz", "GET /readyz"),
                                  ("DELETE", "/metrics", "GET /metrics"),
                                  ("GET", "/v1/classify", "POST /v1/classify"),
                                  ("GET", "/v1/embed", "POST /v1/embed"),
                                  ("GET", "/v1/search", "POST /v1/search"),
                                  ("GET", "/v2/classify", "(unknown)"),
                                  ("GET", "/../../etc/passwd", "(unknown)"),
                                  ("GET", "/v1/index/items", "(unknown)"),
                                  ("GET", "/%00", "(unknown)"),
                                  ("GET", "/" + "z" * 8000, "(unknown)")):
        cases.append(Case(f"{method.lower()}-not-allowed-or-unknown", endpoint, method, url))

    # 6. Keys: none, wrong, malformed, a read key on an admin route (``headers`` replace the test's admin key).
    for name, headers in (("no-key", {}), ("wrong-key", {"authorization": "Bearer not-a-key"}),
                          ("empty-bearer", {"authorization": "Bearer "}),
                          ("basic-auth", {"authorization": "Basic YTpi"}),
                          ("8k-key", {"x-api-key": "k" * 8000}), ("read-key-on-admin", {"x-api-key": READ_KEY})):
        body, json_headers = as_json({"id": "auth-probe", "text": "q"})
        cases.append(Case(f"auth-{name}", "POST /v1/index/items", "POST", "/v1/index/items", body,
                          {**json_headers, **headers, AUTH_OVERRIDE: "1"}))
        cases.append(Case(f"auth-{name}", "DELETE /v1/index/items/{item_id}", "DELETE", "/v1/index/items/a",
                          b"", {**headers, AUTH_OVERRIDE: "1"}))
        if name != "read-key-on-admin":
            cases.append(Case(f"auth-{name}", "POST /v1/embed", "POST", "/v1/embed", body,
                              {**json_headers, **headers, AUTH_OVERRIDE: "1"}))
            cases.append(Case(f"auth-{name}", "GET /v1/model", "GET", "/v1/model", b"",
                              {**headers, AUTH_OVERRIDE: "1"}))
    return cases


def _deep(depth: int) -> dict:
    doc: dict = {"leaf": 1}
    for _ in range(depth):
        doc = {"d": doc}
    return doc
