"""Image bytes -> the image encoder's input tensor, driven only by the bundle manifest.

Training (``model/``) imports the same functions, so the pixels a model was trained on and
the pixels it is served are produced by one code path.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.bundle.manifest import ImagePreprocessing
from app.core.errors import InvalidFieldError, PayloadTooLargeError, UnsupportedMediaTypeError

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

# Formats accepted, identified by their leading bytes (never by filename or Content-Type, which
# clients get wrong and attackers forge).
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's magic bytes, or None if it is not one we accept."""
    for magic, offset, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited onto ``background`` (not dropped to black)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def resize_and_crop(img: Image.Image, spec: ImagePreprocessing) -> Image.Image:
    """Shorter side to ``resize_size`` then a centre crop of ``size`` x ``size``."""
    w, h = img.size
    scale = spec.resize_size / min(w, h)
    new_w, new_h = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    img = img.resize((new_w, new_h), _RESAMPLE[spec.resize])
    left, top = (new_w - spec.size) // 2, (new_h - spec.size) // 2
    return img.crop((left, top, left + spec.size, top + spec.size))


def normalize(img: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """RGB image of the final size -> float32 CHW tensor, ``(x * scale - mean) / std``."""
    arr = np.asarray(img, dtype=np.float32) * np.float32(spec.scale)
    arr = (arr - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_pil(img: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """A decoded, orientation-corrected image -> the model tensor [3, size, size]."""
    return normalize(resize_and_crop(to_rgb(img, spec.background), spec), spec)


def decode_image(data: bytes, spec: ImagePreprocessing, *, max_pixels: int, field: str = "image") -> np.ndarray:
    """Untrusted bytes -> model tensor, or a typed client error (never an unhandled exception).

    The pixel limit is checked from the header, before the pixel data is decoded, so a
    decompression bomb costs nothing. JPEG draft mode lets libjpeg decode at 1/2..1/8 scale
    when the target is much smaller than the source (a 4000x3000 photo in ~20 ms, not ~130 ms).
    """
    if not data:
        raise InvalidFieldError("image is empty (0 bytes)", field=field)
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMediaTypeError(
            "image is not a supported format (JPEG, PNG, WebP, BMP or GIF, identified by content)", field=field
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = img.size
            if w <= 0 or h <= 0:
                raise InvalidFieldError("image has no pixels", field=field)
            if w * h > max_pixels:
                raise PayloadTooLargeError(
                    f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (MMFUSION_MAX_IMAGE_PIXELS)",
                    field=field,
                )
            if fmt == "JPEG":
                # draft() keeps the decoded size >= the requested size, so quality is preserved.
                target = spec.resize_size
                shorter = min(w, h)
                if shorter >= 2 * target:
                    img.draft("RGB", (max(1, w * target // shorter), max(1, h * target // shorter)))
            img.seek(0)  # first frame of animated GIF/WebP
            img.load()
            img = ImageOps.exif_transpose(img) or img
    except (InvalidFieldError, PayloadTooLargeError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLargeError("image exceeds the decompression-bomb pixel limit", field=field) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise InvalidFieldError(f"image could not be decoded as {fmt}: {type(exc).__name__}", field=field) from None
    return preprocess_pil(img, spec)
