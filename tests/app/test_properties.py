"""Property tests (hypothesis) of image decoding: whatever a client sends within the limits, in any
accepted format, pixel mode, size and EXIF orientation, becomes exactly the tensor the manifest
describes (shape, dtype, value range), deterministically, with the orientation applied.

The index has its own property test against a brute-force dict model
(``tests/app/test_index_store.py::test_random_operation_sequences_match_a_dict_model``: any sequence of
add/replace/delete/search/compact, in memory, after a clean close and after a crash).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.bundle.manifest import ImagePreprocessing
from app.core.errors import PayloadTooLargeError
from app.preprocessing.image import decode_image

MAX_SIDE = 160
# (format, pixel mode) pairs a client can really send; each one Pillow writes and our decoder accepts.
FORMAT_MODES = [
    ("PNG", "1"), ("PNG", "L"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "I;16"),
    ("PNG", "I"), ("JPEG", "L"), ("JPEG", "RGB"), ("JPEG", "CMYK"), ("WEBP", "RGB"), ("WEBP", "RGBA"),
    ("GIF", "P"), ("GIF", "L"), ("BMP", "1"), ("BMP", "L"), ("BMP", "P"), ("BMP", "RGB"),
]
LOSSLESS_WITH_EXIF = [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("WEBP", "RGB")]
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def specs(draw: st.DrawFn) -> ImagePreprocessing:
    """Any manifest image section a bundle could declare (small sizes keep the test fast)."""
    size = draw(st.integers(8, 64))
    mean = tuple(draw(st.floats(-1.0, 1.0, allow_nan=False)) for _ in range(3))
    std = tuple(draw(st.floats(0.05, 2.0, allow_nan=False)) for _ in range(3))
    return ImagePreprocessing(size=size, resize_size=size + draw(st.integers(0, 32)),
                              resize=draw(st.sampled_from(["bicubic", "bilinear", "nearest"])),
                              mean=mean, std=std, background=draw(st.tuples(*[st.integers(0, 255)] * 3)))


def make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    """Seeded noise in ``mode``, so every pixel value (and each decoder path) is exercised."""
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I"):
        arr = rng.integers(0, 65536, size=(h, w), dtype=np.uint16)
        img = Image.fromarray(arr, "I;16")
        return img if mode == "I;16" else img.convert("I")
    bands = {"1": 1, "L": 1, "P": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, size=(h, w, bands), dtype=np.uint8)
    if mode in ("1", "L", "P"):
        img = Image.fromarray(arr[:, :, 0], "L")
        return img.convert("1") if mode == "1" else (img.convert("P") if mode == "P" else img)
    return Image.frombytes(mode, (w, h), arr.tobytes())


def encode(img: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kw: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def value_bounds(spec: ImagePreprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel [min, max] of ``(x * scale - mean) / std`` for 8-bit x in [0, 255]."""
    mean, std = np.asarray(spec.mean), np.asarray(spec.std)
    lo, hi = (0 - mean) / std, (255 * spec.scale - mean) / std
    return np.minimum(lo, hi), np.maximum(lo, hi)


@PROPERTY_SETTINGS
@given(fmt_mode=st.sampled_from(FORMAT_MODES), w=st.integers(1, MAX_SIDE), h=st.integers(1, MAX_SIDE),
       orientation=st.one_of(st.none(), st.integers(1, 8)), seed=st.integers(0, 2**16), spec=specs())
def test_any_accepted_image_decodes_to_the_manifest_shape_and_range(
        fmt_mode: tuple[str, str], w: int, h: int, orientation: int | None, seed: int, spec: ImagePreprocessing
) -> None:
    fmt, mode = fmt_mode
    data = encode(make_image(mode, w, h, seed), fmt, orientation if fmt in ("JPEG", "PNG", "WEBP") else None)
    tensor = decode_image(data, spec, max_pixels=MAX_SIDE * MAX_SIDE)
    assert tensor.shape == (3, spec.size, spec.size)
    assert tensor.dtype == np.float32 and tensor.flags.c_contiguous
    assert np.isfinite(tensor).all()
    lo, hi = value_bounds(spec)
    per_channel = tensor.reshape(3, -1)
    assert (per_channel.min(axis=1) >= lo - 1e-4).all(), (per_channel.min(axis=1), lo)
    assert (per_channel.max(axis=1) <= hi + 1e-4).all(), (per_channel.max(axis=1), hi)
    # Deterministic: the same bytes give the same tensor, bit for bit.
    assert np.array_equal(tensor, decode_image(data, spec, max_pixels=MAX_SIDE * MAX_SIDE))


@PROPERTY_SETTINGS
@given(fmt_mode=st.sampled_from(LOSSLESS_WITH_EXIF), w=st.integers(8, 96), h=st.integers(8, 96),
       orientation=st.integers(1, 8), seed=st.integers(0, 2**16), spec=specs())
def test_exif_orientation_gives_the_same_tensor_as_the_upright_image(
        fmt_mode: tuple[str, str], w: int, h: int, orientation: int, seed: int, spec: ImagePreprocessing
) -> None:
    fmt, mode = fmt_mode
    img = make_image(mode, w, h, seed)
    transpose = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
    upright = img.transpose(transpose[orientation]) if orientation in transpose else img
    tagged = decode_image(encode(img, fmt, orientation), spec, max_pixels=10**6)
    plain = decode_image(encode(upright, fmt), spec, max_pixels=10**6)
    np.testing.assert_array_equal(tagged, plain)


@PROPERTY_SETTINGS
@given(w=st.integers(1, 400), h=st.integers(1, 400), limit=st.integers(1, 400 * 400), spec=specs())
def test_the_pixel_limit_is_exact_whatever_the_shape(w: int, h: int, limit: int, spec: ImagePreprocessing) -> None:
    data = encode(Image.new("L", (w, h), 7), "PNG")
    if w * h > limit:
        with pytest.raises(PayloadTooLargeError):
            decode_image(data, spec, max_pixels=limit)
    else:
        assert decode_image(data, spec, max_pixels=limit).shape == (3, spec.size, spec.size)
