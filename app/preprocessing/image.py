"""Image bytes -> the image encoder's input tensor, driven only by the bundle manifest.

Training (``model/``) calls :func:`preprocess_pil` and serving calls :func:`decode_image`, which
ends in the same :func:`preprocess_pil`: first frame, JPEG draft scaling, EXIF orientation, mode
conversion, resize, crop and normalisation are one code path for both halves.

Untrusted bytes are handled in this order, each step refusing before the next costs anything:

1. the format is identified by its magic bytes (:func:`sniff_format`), never by file name or
   Content-Type; only JPEG, PNG, WebP, BMP and GIF are accepted (415 otherwise, including formats
   Pillow could open, such as TIFF or ICO: every extra decoder is extra attack surface);
2. the pixel size is read from the format's own header by this module (:func:`header_size`) and
   checked against ``max_pixels`` (413) before Pillow sees the data: Pillow's WebP decoder allocates
   its canvas when the file is *opened*, and Pillow's own ``Image.MAX_IMAGE_PIXELS`` is a global that
   anything in the process may change, so neither can be the guard;
3. Pillow opens the file (headers only) and the size is checked again (a GIF frame may extend the
   canvas past its header's screen size);
4. the first frame is decoded, scaled down by libjpeg when much larger than needed (draft mode).

Anything that goes wrong from step 3 on is a property of the bytes the client sent, so it becomes a
typed 422 (``InvalidFieldError``), never an unhandled exception.
"""

from __future__ import annotations

import io
import logging
import struct

import numpy as np
from PIL import ExifTags, Image, ImageOps

from app.bundle.manifest import ImagePreprocessing
from app.core.errors import InvalidFieldError, PayloadTooLargeError, UnsupportedMediaTypeError

log = logging.getLogger("mmfusion.preprocessing")

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
# BMP's magic is only two bytes ("BM", which plenty of text starts with), so the DIB header size
# that follows is checked too; these are the header sizes Pillow's BMP decoder understands.
_BMP_HEADER_SIZES = frozenset({12, 40, 64, 108, 124})
# JPEG start-of-frame markers (they carry the size): C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# How much smaller than the source the target must be before JPEG draft mode is used.
DRAFT_MIN_RATIO = 2


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's magic bytes, or None if it is not one we accept."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and len(data) >= 18 and struct.unpack_from("<I", data, 14)[0] in _BMP_HEADER_SIZES:
        return "BMP"
    return None


def _corrupt(fmt: str, why: str, field: str) -> InvalidFieldError:
    return InvalidFieldError(f"image could not be decoded as {fmt}: {why}", field=field)


def _jpeg_size(data: bytes, field: str) -> tuple[int, int]:
    """Walk the marker segments up to the first start-of-frame (which holds height and width)."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise _corrupt("JPEG", f"bad marker at byte {i}", field)
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        (length,) = struct.unpack_from(">H", data, i + 2)
        if length < 2:
            raise _corrupt("JPEG", f"bad segment length at byte {i}", field)
        if marker in _JPEG_SOF:
            if i + 9 > n:
                break
            height, width = struct.unpack_from(">HH", data, i + 5)
            return width, height
        i += 2 + length
    raise _corrupt("JPEG", "no frame header (the file is truncated or not a JPEG image)", field)


def _webp_size(data: bytes, field: str) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        w = 1 + int.from_bytes(data[24:27], "little")
        h = 1 + int.from_bytes(data[27:30], "little")
        return w, h
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", data, 26)
        return w & 0x3FFF, h & 0x3FFF
    raise _corrupt("WEBP", "unknown or truncated header", field)


def header_size(data: bytes, fmt: str, field: str = "image") -> tuple[int, int]:
    """(width, height) read from the file header alone, without decoding anything.

    ``fmt`` is what :func:`sniff_format` returned. A header too short or inconsistent to hold a
    size is a corrupt file (422).
    """
    try:
        if fmt == "JPEG":
            return _jpeg_size(data, field)
        if fmt == "PNG":
            if data[12:16] != b"IHDR":
                raise _corrupt("PNG", "the first chunk is not IHDR", field)
            w, h = struct.unpack_from(">II", data, 16)
            return w, h
        if fmt == "GIF":
            w, h = struct.unpack_from("<HH", data, 6)
            return w, h
        if fmt == "BMP":
            if struct.unpack_from("<I", data, 14)[0] == 12:
                w, h = struct.unpack_from("<HH", data, 18)
                return w, h
            w, h = struct.unpack_from("<ii", data, 18)
            return w, abs(h)  # a negative height means rows are stored top-down
        if fmt == "WEBP":
            return _webp_size(data, field)
    except struct.error:
        raise _corrupt(fmt, "the header is truncated", field) from None
    raise ValueError(f"not an accepted format: {fmt}")


def _check_pixels(w: int, h: int, max_pixels: int, field: str) -> None:
    if w <= 0 or h <= 0:
        raise InvalidFieldError(f"image header declares {w}x{h} pixels: the image has no pixels", field=field)
    if w * h > max_pixels:
        raise PayloadTooLargeError(
            f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (MMFUSION_MAX_IMAGE_PIXELS)",
            field=field,
        )


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited onto ``background``, not dropped to black.

    * ``I;16*`` (16-bit PNG) is scaled from 0..65535; ``I`` (32-bit integer) is taken as 16-bit
      when any value exceeds 255, else as 8-bit; ``F`` (float) is taken as 0..1 when every value
      is within [0, 1], else as 0..255. NaN becomes 0; out-of-range values are clipped.
    * Transparency given as a colour key (``info["transparency"]`` on P, L or RGB images, e.g. a
      PNG tRNS chunk or a GIF transparent index) is treated like an alpha channel.
    * ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr`` convert with Pillow's own conversions.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16"):
            hi = 65535.0
        elif img.mode == "F" and peak <= 1.0 and float(arr.min(initial=0.0)) >= 0.0:
            hi = 1.0
        else:
            hi = 65535.0 if img.mode == "I" and peak > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if "transparency" in img.info and img.mode in ("P", "L", "RGB", "1"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def resize_and_crop(img: Image.Image, spec: ImagePreprocessing) -> Image.Image:
    """Shorter side to ``resize_size`` then a centre crop of ``size`` x ``size``, in one resample.

    Pillow's ``resize(box=...)`` resamples only the source region that the crop keeps, with the
    same filter positions and support as resizing the whole image and cropping after (the support
    still reads pixels outside the box), so the result is the same to +-1 in a rare pixel from
    rounding, and only the kept pixels are computed: 640x480 -> 224x224 bicubic in 2.0 ms instead of
    3.5 ms (the pixels the crop throws away were 42% of the resize).
    """
    w, h = img.size
    scale = spec.resize_size / min(w, h)
    new_w, new_h = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    left, top = (new_w - spec.size) // 2, (new_h - spec.size) // 2
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + spec.size) * sx, (top + spec.size) * sy)
    return img.resize((spec.size, spec.size), _RESAMPLE[spec.resize], box=box)


def normalize(img: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """RGB image of the final size -> float32 CHW tensor, ``(x * scale - mean) / std``.

    Computed as ``x * (scale / std) + (-mean / std)`` in one multiply into the CHW output and one
    in-place add: 0.16 ms instead of 0.96 ms for the five whole-array passes of the literal formula
    (224x224, measured 2026-11-29). The rounding differs from the literal formula by at most 5e-7
    absolute (ImageNet and CLIP mean/std; exactly equal for the default bundle's 0.5/0.5), three
    orders of magnitude under the export parity bound.
    """
    std = np.asarray(spec.std, dtype=np.float32)
    gain = (np.float32(spec.scale) / std)[:, None, None]
    offset = (-np.asarray(spec.mean, dtype=np.float32) / std)[:, None, None]
    chw = np.asarray(img).transpose(2, 0, 1)
    out = np.empty(chw.shape, dtype=np.float32)
    np.multiply(chw, gain, out=out, casting="unsafe")
    out += offset
    return out


def apply_draft(img: Image.Image, spec: ImagePreprocessing) -> bool:
    """Let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale; True if it will.

    Only when the shorter side is at least ``DRAFT_MIN_RATIO`` x ``resize_size``; libjpeg picks the
    largest reduction that keeps the decoded shorter side >= ``resize_size``, so the final resize
    is still a downscale and quality is kept (a 4000x3000 photo decodes ~6x faster; the test
    ``test_jpeg_draft_*`` pins speed and closeness). A no-op for other formats and for an image
    already loaded.
    """
    if img.format not in ("JPEG", "MPO"):  # MPO: multi-picture JPEG from some cameras, first picture used
        return False
    w, h = img.size
    shorter, target = min(w, h), spec.resize_size
    if shorter < DRAFT_MIN_RATIO * target:
        return False
    result = img.draft("RGB", (max(1, w * target // shorter), max(1, h * target // shorter)))
    return result is not None and img.size != (w, h)


def orient(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways with a rotation tag).

    A malformed EXIF block does not make the pixels unusable, so it is ignored (the image is
    used as stored) rather than failing the request.
    """
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return img  # exif_transpose copies the whole image even when there is nothing to turn
        return ImageOps.exif_transpose(img) or img
    except Exception as exc:  # any EXIF parser failure means "no usable orientation"
        log.debug("ignoring unreadable EXIF orientation: %s: %s", type(exc).__name__, exc)
        return img


def preprocess_pil(img: Image.Image, spec: ImagePreprocessing, *, draft: bool = True) -> np.ndarray:
    """An opened image (lazy or loaded) -> the model tensor [3, size, size], float32.

    First frame of animations, JPEG draft scaling (``draft=False`` decodes at full size, for
    comparisons), EXIF orientation, mode conversion, resize, centre crop, normalisation.
    """
    if img.tell() != 0:  # an opened file starts at frame 0; a caller may have moved it
        img.seek(0)
    if draft:
        apply_draft(img, spec)
    img.load()
    img = orient(img)
    return normalize(resize_and_crop(to_rgb(img, spec.background), spec), spec)


def decode_image(data: bytes, spec: ImagePreprocessing, *, max_pixels: int, field: str = "image",
                 draft: bool = True) -> np.ndarray:
    """Untrusted bytes -> model tensor, or a typed client error (never an unhandled exception).

    415 for anything that is not JPEG/PNG/WebP/BMP/GIF by content, 413 for more than ``max_pixels``
    (decided from the header, before any pixel is decoded), 422 for empty, truncated or corrupt data.
    """
    if not data:
        raise InvalidFieldError(f"{field} is empty (0 bytes)", field=field)
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMediaTypeError(
            f"{field} is not a supported image format (JPEG, PNG, WebP, BMP or GIF, identified by content)",
            field=field,
        )
    _check_pixels(*header_size(data, fmt, field), max_pixels, field)
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
        _check_pixels(*img.size, max_pixels, field)
        return preprocess_pil(img, spec, draft=draft)
    except (InvalidFieldError, PayloadTooLargeError, MemoryError):
        raise  # MemoryError is the server's problem (the size was within the limit), not the client's
    except Image.DecompressionBombError:
        # Pillow's own safety net (2x Image.MAX_IMAGE_PIXELS); only reachable when the configured
        # limit is above it.
        raise PayloadTooLargeError(f"{field} exceeds the decoder's decompression-bomb pixel limit",
                                   field=field) from None
    except Exception as exc:
        # Whatever a decoder raises on these bytes (OSError "truncated", SyntaxError, struct.error,
        # ValueError for a mode it cannot convert, ...) describes the client's data, not a server
        # fault. Only the exception type is reported: its text can carry internal details.
        log.info("rejected undecodable %s %s: %s: %s", fmt, field, type(exc).__name__, exc)
        raise _corrupt(fmt, _reason(exc), field) from None


def _reason(exc: Exception) -> str:
    text = str(exc).lower()
    if "truncated" in text or isinstance(exc, EOFError):
        return "the file is truncated"
    return f"corrupt or unsupported data ({type(exc).__name__})"
