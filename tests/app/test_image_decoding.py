"""Untrusted image bytes -> tensor or a typed 4xx: every accepted mode, every refusal, through
``decode_image`` directly and through the app. All images are generated here.

The pure tests use a preprocessing spec with mean 0, std 1 and scale 1/255, so the tensor is the
RGB pixel / 255 and a pixel can be read back and compared with the colour that was drawn.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from app.bundle.manifest import ImagePreprocessing
from app.core.errors import InvalidFieldError, MMFusionError, PayloadTooLargeError, UnsupportedMediaTypeError
from app.preprocessing.image import apply_draft, decode_image, header_size, sniff_format

BACKGROUND = (10, 200, 30)
SPEC = ImagePreprocessing(size=32, resize_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), background=BACKGROUND)
LIMIT = 40_000_000
RED, GREEN, BLUE, YELLOW = (220, 20, 20), (20, 220, 20), (20, 20, 220), (230, 230, 20)


def encode(img: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def pixel(tensor: np.ndarray, row: int, col: int) -> tuple[int, int, int]:
    """RGB 0..255 of the decoded tensor at (row, col)."""
    return tuple(round(float(v) * 255) for v in tensor[:, row, col])  # type: ignore[return-value]


def centre(tensor: np.ndarray) -> tuple[int, int, int]:
    return pixel(tensor, tensor.shape[1] // 2, tensor.shape[2] // 2)


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 3) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def decode(data: bytes, **kw: object) -> np.ndarray:
    return decode_image(data, SPEC, max_pixels=kw.pop("max_pixels", LIMIT), **kw)  # type: ignore[arg-type]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid-looking PNG whose IHDR claims width x height; the data is one tiny deflate stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
            + png_chunk(b"IEND", b""))


def bomb_webp() -> bytes:
    """An extended WebP (VP8X) header claiming a 16384 x 16384 canvas."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (16383).to_bytes(3, "little") * 2
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def bomb_jpeg() -> bytes:
    """A real small JPEG whose start-of-frame is patched to claim 65000 x 65000."""
    data = bytearray(encode(Image.new("RGB", (16, 16), RED), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 65000, 65000)
    return bytes(data)


def bomb_gif_screen() -> bytes:
    data = bytearray(encode(Image.new("P", (16, 16), 1), "GIF"))
    struct.pack_into("<HH", data, 6, 65000, 65000)
    return bytes(data)


def bomb_gif_frame() -> bytes:
    """A 16 x 16 screen whose first frame descriptor extends the canvas to 65000 x 65000."""
    data = bytearray(encode(Image.new("P", (16, 16), 1), "GIF"))
    desc = data.index(b",")
    struct.pack_into("<HH", data, desc + 5, 65000, 65000)
    return bytes(data)


def bomb_bmp() -> bytes:
    data = bytearray(encode(Image.new("RGB", (4, 4), RED), "BMP"))
    struct.pack_into("<ii", data, 18, 60000, -60000)
    return bytes(data)


# --------------------------------------------------------------------------------------------------
# Formats and modes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "save", "tol"), [
    ("JPEG", {"quality": 95}, 4), ("PNG", {}, 0), ("WEBP", {"lossless": True}, 0), ("WEBP", {"quality": 90}, 6),
    ("BMP", {}, 0), ("GIF", {}, 8),
])
def test_each_accepted_format_decodes_to_the_drawn_colour(fmt: str, save: dict, tol: int) -> None:
    data = encode(Image.new("RGB", (48, 40), RED), fmt, **save)
    out = decode(data)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    assert close(centre(out), RED, tol), centre(out)


# Displayed quadrants (TL, TR, BL, BR) for a stored image with quadrants R, G, B, Y, per EXIF orientation.
ORIENTED = {
    1: (RED, GREEN, BLUE, YELLOW),
    2: (GREEN, RED, YELLOW, BLUE),  # mirrored left-right
    3: (YELLOW, BLUE, GREEN, RED),  # rotated 180
    6: (BLUE, RED, YELLOW, GREEN),  # stored rotated: display = 90 degrees clockwise
    8: (GREEN, YELLOW, RED, BLUE),  # display = 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_exif_orientation_is_applied_read_back_by_pixel(orientation: int) -> None:
    w, h = 96, 48  # landscape as stored; orientations 6 and 8 display it as portrait
    img = Image.new("RGB", (w, h))
    for (x0, y0), colour in zip([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)], ORIENTED[1], strict=True):
        img.paste(colour, (x0, y0, x0 + w // 2, y0 + h // 2))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == orientation
    out = decode(data)
    quarter, three = 8, 24  # centre crop of the displayed image: quadrant centres stay inside their quadrant
    got = tuple(pixel(out, row, col) for row in (quarter, three) for col in (quarter, three))
    for actual, expected in zip(got, ORIENTED[orientation], strict=True):
        assert close(actual, expected, 30), (orientation, got)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_exif_is_ignored_not_refused() -> None:
    data = encode(Image.new("RGB", (40, 40), RED), "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*garbage-garbage")
    assert close(centre(decode(data)), RED, 4)


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert close(centre(decode(data)), (255, 0, 0), 4)


def test_grayscale_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("L", (40, 40), 90), "JPEG", quality=95)
    assert close(centre(decode(data)), (90, 90, 90), 2)


def test_16_bit_png_is_scaled_from_the_full_16_bit_range_not_clipped() -> None:
    img = Image.new("I;16", (64, 32), 65535)
    img.paste(16448, (32, 0, 64, 32))  # 16448 / 65535 * 255 = 64
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode(data)
    # The 64x32 image is cropped to its middle 32x32 after the resize: left half white, right half 64.
    assert close(pixel(out, 16, 4), (255, 255, 255), 1)
    assert close(pixel(out, 16, 28), (64, 64, 64), 1)


def test_la_png_is_composited_on_the_manifest_background() -> None:
    img = Image.new("LA", (40, 40), (0, 0))  # fully transparent black
    img.paste((255, 255), (0, 0, 40, 20))  # top half opaque white
    out = decode(encode(img, "PNG"))
    assert close(pixel(out, 4, 16), (255, 255, 255), 1)
    assert close(pixel(out, 28, 16), BACKGROUND, 1)


def test_rgba_png_half_transparent_blends_with_the_background() -> None:
    out = decode(encode(Image.new("RGBA", (40, 40), (*RED, 128)), "PNG"))
    expected = tuple(round((c * 128 + b * 127) / 255) for c, b in zip(RED, BACKGROUND, strict=True))
    assert close(centre(out), expected, 2)


def test_palette_png_with_a_transparent_index_uses_the_background() -> None:
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * (256 - 2) * 3)
    img.paste(1, (0, 0, 20, 40))  # left half: index 1 (red); right half: index 0 (transparent)
    data = encode(img, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode(data)
    assert close(pixel(out, 16, 4), RED, 0)
    assert close(pixel(out, 16, 28), BACKGROUND, 0)


@pytest.mark.parametrize(("mode", "colour", "key"), [("RGB", RED, RED), ("L", 77, 77)])
def test_colour_key_transparency_trns_uses_the_background(mode: str, colour: object, key: object) -> None:
    data = encode(Image.new(mode, (40, 40), colour), "PNG", transparency=key)  # type: ignore[arg-type]
    assert "transparency" in Image.open(io.BytesIO(data)).info
    assert close(centre(decode(data)), BACKGROUND, 0)


def test_one_bit_image_is_black_and_white() -> None:
    img = Image.new("1", (40, 40), 0)
    img.paste(1, (0, 0, 20, 40))
    for fmt in ("PNG", "BMP"):
        out = decode(encode(img, fmt))
        assert close(pixel(out, 16, 4), (255, 255, 255), 0), fmt
        assert close(pixel(out, 16, 28), (0, 0, 0), 0), fmt


@pytest.mark.parametrize(("fmt", "save"), [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {}), ("MPO", {})])
def test_animations_and_multi_picture_files_use_the_first_frame(fmt: str, save: dict) -> None:
    frames = [Image.new("RGB", (80, 80) if fmt == "MPO" else (40, 40), c) for c in (RED, BLUE, GREEN)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **save)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert close(centre(decode(data)), RED, 8)


def test_gif_whose_first_frame_is_transparent_shows_the_background() -> None:
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * 254 * 3)
    data = encode(img, "GIF", transparency=0)
    assert close(centre(decode(data)), BACKGROUND, 0)


@pytest.mark.parametrize(("mode", "value", "expected"), [
    ("I", 40000, 156),  # > 255: a 16-bit range, 40000 / 65535 * 255
    ("I", 200, 200),  # <= 255: already 8-bit
    ("F", 0.5, 128),  # within [0, 1]
    ("F", 100.0, 100),  # above 1: 0..255
])
def test_integer_and_float_modes_become_8_bit_rgb(mode: str, value: float, expected: int) -> None:
    from app.preprocessing.image import preprocess_pil

    out = preprocess_pil(Image.new(mode, (40, 40), value), SPEC)
    assert close(centre(out), (expected,) * 3, 1)


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------


REFUSED_FORMATS = {
    "svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
    "svg-bare": b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="10" height="10"/></svg>',
    "html": b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
    "pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF",
    "text-starting-with-BM": b"BMW is a car maker, not a bitmap header",
    "zip": b"PK\x03\x04" + b"\x00" * 40,
    "two-bytes-of-jpeg": b"\xff\xd8",
}


@pytest.mark.parametrize("name", sorted(REFUSED_FORMATS))
def test_non_images_renamed_as_jpeg_are_415(name: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError) as err:
        decode(REFUSED_FORMATS[name])
    assert err.value.status_code == 415 and err.value.field == "image"


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM", "TGA"])
def test_formats_pillow_could_open_but_we_do_not_accept_are_415(fmt: str) -> None:
    data = encode(Image.new("RGB", (32, 32), RED), fmt)
    assert Image.open(io.BytesIO(data)).format is not None  # Pillow would decode it
    with pytest.raises(UnsupportedMediaTypeError):
        decode(data)


def test_empty_file_is_422() -> None:
    with pytest.raises(InvalidFieldError, match="empty"):
        decode(b"")


BOMBS = {"png": bomb_png, "webp": bomb_webp, "jpeg": bomb_jpeg, "gif-screen": bomb_gif_screen,
         "gif-first-frame": bomb_gif_frame, "bmp": bomb_bmp}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decompression_bombs_are_413_from_the_header_even_without_pillows_limit(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # our guard must not depend on Pillow's global
    data = BOMBS[name]()
    assert len(data) < 2000
    t = time.perf_counter()
    with pytest.raises(PayloadTooLargeError, match="MMFUSION_MAX_IMAGE_PIXELS") as err:
        decode(data)
    assert time.perf_counter() - t < 0.5  # refused without allocating or decoding the claimed pixels
    assert err.value.status_code == 413 and err.value.field == "image"


def test_png_bomb_header_is_read_without_pillow() -> None:
    assert sniff_format(bomb_png()) == "PNG"
    assert header_size(bomb_png(), "PNG") == (50_000, 50_000)


def test_the_configured_pixel_limit_applies_to_ordinary_images() -> None:
    data = encode(Image.new("RGB", (200, 100), RED), "PNG")
    assert decode(data, max_pixels=20_000).shape == (3, 32, 32)
    with pytest.raises(PayloadTooLargeError, match="200x100 = 20000 pixels, over the limit of 19999"):
        decode(data, max_pixels=19_999)


def photo_like(size: tuple[int, int] = (96, 64), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    arr = np.stack([128 + 60 * np.sin(x / (7 + 3 * c) + y / 11 + c) for c in range(3)], axis=-1)
    arr += rng.normal(0, 8, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_truncated_files_are_422_with_a_message(fmt: str) -> None:
    data = encode(photo_like(), fmt)
    for cut in (len(data) // 2, 30, 20):
        with pytest.raises(InvalidFieldError) as err:
            decode(data[:cut])
        assert err.value.status_code == 422 and err.value.field == "image"
        assert fmt in err.value.message, err.value.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_corrupted_bytes_never_escape_as_untyped_exceptions(fmt: str) -> None:
    """Seeded fuzzing: flipped bytes, cut files and spliced garbage give a tensor or a typed 4xx."""
    rng = random.Random(fmt)
    base = encode(photo_like(seed=1), fmt)
    outcomes: dict[str, int] = {}
    for _ in range(60):
        data = bytearray(base)
        kind = rng.choice(["flip", "cut", "splice"])
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == "cut":
            data = data[: rng.randrange(1, len(data))]
        else:
            at = rng.randrange(len(data))
            data[at:at + 16] = bytes(rng.randrange(256) for _ in range(16))
        try:
            out = decode(bytes(data))
        except MMFusionError as exc:
            assert exc.status_code in (413, 415, 422), exc
            assert exc.field == "image"
            outcomes[str(exc.status_code)] = outcomes.get(str(exc.status_code), 0) + 1
        else:
            assert out.shape == (3, 32, 32) and np.isfinite(out).all()
            outcomes["decoded"] = outcomes.get("decoded", 0) + 1
    assert outcomes.get("422", 0) > 0, outcomes  # the fuzzing did reach the decoder's error paths


# --------------------------------------------------------------------------------------------------
# JPEG draft mode
# --------------------------------------------------------------------------------------------------


def phone_photo(w: int = 4000, h: int = 3000, seed: int = 0) -> bytes:
    """A 12-megapixel JPEG with smooth gradients, hard-edged shapes and sensor noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    arr = np.empty((h, w, 3), dtype=np.float32)
    for c in range(3):
        arr[..., c] = 128 + 50 * np.sin(6 * x + 4 * y + c) + 30 * np.cos(15 * x * (c + 1) - 9 * y)
    for _ in range(25):
        x0, y0 = int(rng.integers(0, w - 500)), int(rng.integers(0, h - 500))
        arr[y0:y0 + int(rng.integers(60, 500)), x0:x0 + int(rng.integers(60, 500))] = rng.uniform(0, 255, 3)
    arr += rng.normal(0, 3, (h, w, 1)).astype(np.float32)
    return encode(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "JPEG", quality=90)


@pytest.fixture(scope="module")
def photo_4000x3000() -> bytes:
    return phone_photo()


def test_jpeg_draft_decodes_a_4000x3000_photo_at_reduced_scale(photo_4000x3000: bytes) -> None:
    spec = ImagePreprocessing(size=224, resize_size=256, mean=(0.5,) * 3, std=(0.5,) * 3)
    img = Image.open(io.BytesIO(photo_4000x3000))
    assert apply_draft(img, spec) is True
    img.load()
    assert img.size == (500, 375)  # 1/8 scale: the shorter side (375) still >= resize_size (256)
    small = Image.open(io.BytesIO(encode(Image.new("RGB", (400, 300)), "JPEG")))
    assert apply_draft(small, spec) is False  # shorter side < 2 x 256: full decode
    mpo = encode(Image.new("RGB", (1200, 1000), RED), "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    multi = Image.open(io.BytesIO(mpo))
    assert multi.format == "MPO" and apply_draft(multi, spec) is True
    assert apply_draft(Image.open(io.BytesIO(encode(Image.new("RGB", (1200, 1000)), "PNG"))), spec) is False


def test_jpeg_draft_is_faster_and_features_stay_close(photo_4000x3000: bytes) -> None:
    spec = ImagePreprocessing(size=224, resize_size=256, mean=(0.5,) * 3, std=(0.5,) * 3)

    def best_of(n: int, draft: bool) -> tuple[float, np.ndarray]:
        times, out = [], None
        for _ in range(n):
            t = time.perf_counter()
            out = decode_image(photo_4000x3000, spec, max_pixels=LIMIT, draft=draft)
            times.append(time.perf_counter() - t)
        assert out is not None
        return min(times), out

    plain_s, plain = best_of(3, draft=False)
    draft_s, drafted = best_of(3, draft=True)
    a, b = plain.ravel().astype(np.float64), drafted.ravel().astype(np.float64)
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    mean_abs_255 = float(np.abs(a - b).mean()) * 0.5 * 255  # back to 0..255 pixel units (std 0.5)
    print(f"4000x3000 JPEG: plain {plain_s * 1000:.1f} ms, draft {draft_s * 1000:.1f} ms, "
          f"cosine {cosine:.6f}, mean |diff| {mean_abs_255:.3f} / 255")
    assert cosine > 0.999
    assert mean_abs_255 < 1.5
    assert draft_s < 0.6 * plain_s


# --------------------------------------------------------------------------------------------------
# Through the app
# --------------------------------------------------------------------------------------------------


def assert_error(r, status: int, code: str, field: str | None = "image") -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) <= {"code", "message", "field"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    if field is not None:
        assert body["error"].get("field") == field


ACCEPTED = {
    "exif-jpeg": lambda: encode(Image.new("RGB", (60, 40), RED), "JPEG", exif=_exif(6)),
    "cmyk-jpeg": lambda: encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"),
    "16-bit-png": lambda: encode(Image.new("I;16", (40, 40), 30000), "PNG"),
    "la-png": lambda: encode(Image.new("LA", (40, 40), (100, 50)), "PNG"),
    "rgba-png": lambda: encode(Image.new("RGBA", (40, 40), (*RED, 0)), "PNG"),
    "palette-transparent-png": lambda: encode(Image.new("P", (40, 40), 3), "PNG", transparency=3),
    "1-bit-png": lambda: encode(Image.new("1", (40, 40), 1), "PNG"),
    "animated-gif": lambda: encode(Image.new("RGB", (40, 40), RED), "GIF", save_all=True,
                                   append_images=[Image.new("RGB", (40, 40), BLUE)]),
    "webp": lambda: encode(Image.new("RGB", (40, 40), RED), "WEBP"),
    "bmp": lambda: encode(Image.new("RGB", (40, 40), RED), "BMP"),
}


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_app_accepts_every_mode_multipart_and_json(client, name: str) -> None:
    data = ACCEPTED[name]()
    r = client.post("/v1/embed", files={"image": ("photo.bin", data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    r2 = client.post("/v1/embed", json={"image_base64": base64.b64encode(data).decode()})
    assert r2.status_code == 200, r2.text
    assert r.json()["image_embedding"] == pytest.approx(r2.json()["image_embedding"], abs=1e-6)


REFUSED_IN_APP = {
    "svg-as-jpg": (REFUSED_FORMATS["svg"], 415, "unsupported_media_type"),
    "html-as-jpg": (REFUSED_FORMATS["html"], 415, "unsupported_media_type"),
    "pdf-as-jpg": (REFUSED_FORMATS["pdf"], 415, "unsupported_media_type"),
    "tiff": (encode(Image.new("RGB", (8, 8)), "TIFF"), 415, "unsupported_media_type"),
    "ico": (encode(Image.new("RGB", (16, 16)), "ICO"), 415, "unsupported_media_type"),
    "png-bomb": (bomb_png(), 413, "payload_too_large"),
    "webp-bomb": (bomb_webp(), 413, "payload_too_large"),
    "truncated-jpeg": (encode(photo_like(), "JPEG")[:700], 422, "invalid_field"),
    "zero-bytes": (b"", 422, "invalid_field"),
}


@pytest.mark.parametrize("name", sorted(REFUSED_IN_APP))
def test_app_refuses_bad_images_with_the_error_schema(client, name: str) -> None:
    data, status, code = REFUSED_IN_APP[name]
    r = client.post("/v1/classify", files={"image": ("photo.jpg", data, "image/jpeg")},
                    data={"text": "what color is the circle?"})
    assert_error(r, status, code, "image")
    r = client.post("/v1/classify", json={"image_base64": base64.b64encode(data).decode() or "", "text": "hi"})
    if data:  # the error names the field as the client sent it: image_base64 in JSON (as in the batch route)
        assert_error(r, status, code, "image_base64")
    else:  # an empty image_base64 string fails the JSON schema (min_length=1) before decoding
        assert_error(r, 422, "invalid_field", "image_base64")


def test_app_decodes_in_the_decode_thread_pool_not_on_the_event_loop(client, monkeypatch) -> None:
    import app.api.work as work

    threads: list[str] = []
    real = work.decode_image

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(work, "decode_image", spy)
    png = encode(Image.new("RGB", (40, 40), RED), "PNG")
    r = client.post("/v1/embed", files={"image": ("a.png", png, "image/png")})
    assert r.status_code == 200, r.text
    assert len(threads) == 1 and threads[0].startswith("decode"), threads
    assert threads[0] != threading.main_thread().name


def test_resize_and_crop_in_one_resample_equals_resizing_the_whole_image_then_cropping() -> None:
    from PIL import Image

    from app.bundle.manifest import ImagePreprocessing
    from app.preprocessing.image import _RESAMPLE, resize_and_crop

    rng = np.random.default_rng(3)
    for (w, h), resample in [((640, 480), "bicubic"), ((300, 1000), "bilinear"), ((224, 224), "bicubic"),
                             ((257, 700), "bicubic"), ((500, 400), "nearest")]:
        spec = ImagePreprocessing(size=224, resize_size=256, resize=resample, mean=(0.5,) * 3, std=(0.5,) * 3)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        scale = spec.resize_size / min(w, h)
        new_w, new_h = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
        left, top = (new_w - spec.size) // 2, (new_h - spec.size) // 2
        whole = img.resize((new_w, new_h), _RESAMPLE[resample]).crop((left, top, left + 224, top + 224))
        got = resize_and_crop(img, spec)
        assert got.size == (224, 224)
        diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(whole, dtype=np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.01, (w, h, resample, diff.max(), diff.mean())


@pytest.mark.parametrize(("mean", "std"), [
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # the default bundle's
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet
    ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # CLIP
])
def test_normalize_equals_the_literal_formula_in_chw_layout(mean: tuple, std: tuple) -> None:
    from app.preprocessing.image import normalize

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    spec = ImagePreprocessing(size=40, resize_size=40, mean=mean, std=std)
    literal = (np.asarray(img, np.float32) * np.float32(spec.scale) - np.asarray(mean, np.float32)) / np.asarray(
        std, np.float32)
    out = normalize(img, spec)
    assert out.dtype == np.float32 and out.shape == (3, 48, 40) and out.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(out, literal.transpose(2, 0, 1), rtol=0, atol=1e-6)
