"""Real images generated in tests (no fixtures on disk)."""

from __future__ import annotations

import io

from PIL import Image


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (96, 96), mode: str = "RGB",
                color: tuple[int, ...] | int = (200, 30, 30), **save: object) -> bytes:
    img = Image.new(mode, size, color)  # type: ignore[arg-type]
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def demo_png(demo_root, index: int = 0) -> bytes:  # type: ignore[no-untyped-def]
    from pathlib import Path

    paths = sorted((Path(demo_root) / "images").glob("*.png"))
    return paths[index].read_bytes()
