"""Built-in demo dataset: seeded synthetic scenes with captions and question/answer pairs.

Why it exists: ``mmfusion`` must train, export and serve end to end with no download and no
user data, and the demo task must actually *need* both modalities, or a broken fusion layer
would go unnoticed:

* Classification is visual question answering. The label is the answer to a question about
  the image ("what color is the circle?"), drawn from a fixed vocabulary. Scenes and questions
  are sampled so that the answer given the question text alone is close to uniform within a
  question type (a text-only model stays near chance) and an image alone does not say which
  question was asked (an image-only model stays near chance too).
* Retrieval is caption <-> image. Captions name every shape's size, colour, kind and grid cell
  plus the background, so a caption rarely fits two images.

Everything is derived from ``DemoConfig.seed`` through per-image random streams, so the same
config gives byte-identical files on every machine, and image ``i`` does not depend on how many
images were asked for (a small run is a prefix of a large one).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

FORMAT_VERSION = 1
"""Bump whenever rendering, captions or questions change, so cached datasets are regenerated."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Three kinds whose silhouettes stay distinct even at 64 px (a star or diamond would not)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 220, 30),
    "purple": (140, 50, 185),
    "orange": (250, 125, 15),
}
"""Shape colours; every pair is > 90 apart in RGB so per-shape jitter never blurs two names."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 236),
    "gray": (128, 128, 128),
    "black": (24, 24, 24),
    "beige": (222, 205, 170),
    "navy": (20, 30, 80),
    "pink": (240, 190, 205),
}
"""Background colours: none shares a name (or a word) with a shape colour, and each is far from
all of them in RGB, so a shape never disappears into its background."""

SIZES: tuple[str, ...] = ("small", "large")
SIZE_RADIUS_FRACTION: dict[str, float] = {"small": 0.26, "large": 0.42}
"""Shape radius as a fraction of a grid cell: the two sizes differ by > 2.5x in area."""

CELLS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
"""The 3x3 grid in reading order; captions list shapes in this order."""

GRID_MARGIN_FRACTION = 0.08
"""The grid leaves this share of the image free on each side, so the usual resize-256 /
centre-crop-224 preprocessing (which trims 6.25% per side) never cuts a shape."""

COUNTS: tuple[str, ...] = ("1", "2", "3")
MAX_SHAPES = len(SHAPES)
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exists", "size")
SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")

_COLOR_JITTER = 10
"""Per-channel colour jitter of each shape, so models learn colour names, not exact RGB values."""


@dataclass(frozen=True)
class DemoConfig:
    """Everything that determines the generated dataset; equal configs give identical files."""

    n_images: int = 600
    image_size: int = 224
    questions_per_image: int = 4
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    """Train/val/test shares, by image: all questions and the caption of an image share a split,
    so no test image was seen in training under a different question."""

    def __post_init__(self) -> None:
        if self.n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {self.n_images}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 so small shapes stay visible, got {self.image_size}")
        if self.questions_per_image < 1:
            raise ValueError(f"questions_per_image must be >= 1, got {self.questions_per_image}")
        fr = tuple(float(f) for f in self.split_fractions)
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be 3 non-negative shares summing to 1, got {fr}")
        object.__setattr__(self, "split_fractions", fr)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["split_fractions"] = list(self.split_fractions)
        return d


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene; ``center`` and ``radius`` are in pixels of the sampled image size."""

    kind: str
    color: str
    size: str
    cell: str
    center: tuple[int, int]
    radius: int


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to render a scene; ``seed`` drives the background texture and jitter."""

    shapes: tuple[ShapeSpec, ...]
    background: str
    seed: int


@dataclass(frozen=True)
class DemoDatasetPaths:
    """Where ``generate_demo_dataset`` put things (all inside ``root``)."""

    root: Path
    qa: Path
    captions: Path
    labels: Path


RandomLike = random.Random | np.random.Generator


def _as_random(rng: RandomLike) -> random.Random:
    """Accept either RNG flavour; a numpy Generator seeds a private ``random.Random`` from itself."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(0, 2**63 - 1)))
    raise TypeError(f"expected random.Random or numpy.random.Generator, got {type(rng).__name__}")


def _grid(image_size: int) -> tuple[float, float]:
    """(left/top offset of the grid, side of one cell) in pixels."""
    margin = GRID_MARGIN_FRACTION * image_size
    return margin, (image_size - 2 * margin) / 3


def shape_radius(size: str, image_size: int) -> int:
    """Pixel radius of a ``size`` shape (circle radius, square half-side, triangle half-width)."""
    _, cell = _grid(image_size)
    return max(2, round(SIZE_RADIUS_FRACTION[size] * cell))


def cell_bounds(cell: str, image_size: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a grid cell in pixels."""
    margin, side = _grid(image_size)
    row, col = divmod(CELLS.index(cell), 3)
    left, top = margin + col * side, margin + row * side
    return left, top, left + side, top + side


def sample_scene(rng: RandomLike, image_size: int) -> SceneSpec:
    """Sample 1-3 shapes with distinct kinds, colours and cells on a named background.

    Kinds and colours are unique within a scene so "what color is the circle?" and "what shape
    is red?" have exactly one answer; the count is uniform over 1..3 so "how many shapes are
    there?" has a uniform prior. Each shape gets seeded jitter that keeps it inside its cell.
    """
    r = _as_random(rng)
    n = r.randint(1, MAX_SHAPES)
    kinds = r.sample(SHAPES, n)
    colors = r.sample(list(COLORS), n)
    cells = r.sample(CELLS, n)
    shapes = []
    for kind, color, cell in zip(kinds, colors, cells, strict=True):
        size = r.choice(SIZES)
        radius = shape_radius(size, image_size)
        left, top, right, bottom = cell_bounds(cell, image_size)
        cx, cy = round((left + right) / 2), round((top + bottom) / 2)
        # Largest offset that keeps the whole shape (plus a 1 px gap) inside its cell.
        slack_x = max(0, min(cx - radius - left, right - cx - radius) - 1)
        slack_y = max(0, min(cy - radius - top, bottom - cy - radius) - 1)
        jx = r.randint(-int(slack_x), int(slack_x))
        jy = r.randint(-int(slack_y), int(slack_y))
        shapes.append(ShapeSpec(kind, color, size, cell, (cx + jx, cy + jy), radius))
    shapes.sort(key=lambda s: CELLS.index(s.cell))
    return SceneSpec(shapes=tuple(shapes), background=r.choice(list(BACKGROUNDS)), seed=r.getrandbits(32))


def _background(scene: SceneSpec, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Base colour + a smooth low-frequency texture + fine grain, so no image is flat."""
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    coarse = rng.normal(0.0, 1.0, size=(6, 6)).astype(np.float32)
    smooth = Image.fromarray(coarse).resize((image_size, image_size), Image.Resampling.BICUBIC)
    texture = np.asarray(smooth, dtype=np.float32)[:, :, None] * 7.0
    # Luminance-only grain: looks the same to a model as per-channel grain, PNGs half the size.
    grain = rng.normal(0.0, 4.0, size=(image_size, image_size, 1)).astype(np.float32)
    return np.clip(base + texture + grain + 0.5, 0, 255).astype(np.uint8)


def _outline(shape: ShapeSpec, scale: int) -> tuple[str, list[tuple[float, float]]]:
    cx, cy, r = shape.center[0] * scale, shape.center[1] * scale, shape.radius * scale
    if shape.kind == "circle":
        return "ellipse", [(cx - r, cy - r), (cx + r, cy + r)]
    if shape.kind == "square":
        return "rectangle", [(cx - r, cy - r), (cx + r, cy + r)]
    if shape.kind == "triangle":
        return "polygon", [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    raise ValueError(f"unknown shape kind {shape.kind!r}")


def render_scene(scene: SceneSpec, image_size: int) -> Image.Image:
    """Render ``scene`` as an RGB ``image_size`` square; identical output for an identical scene.

    Shapes are drawn as 2x supersampled masks reduced with a box filter (antialiased edges, so a
    CNN cannot key on jaggies) and pasted over the noisy background.
    """
    for s in scene.shapes:
        x, y = s.center
        if not (s.radius <= x <= image_size - s.radius and s.radius <= y <= image_size - s.radius):
            raise ValueError(f"{s} does not fit a {image_size}px image; sample the scene at this size")
    rng = np.random.default_rng(scene.seed)
    img = Image.fromarray(_background(scene, image_size, rng))
    ss = 2
    for s in scene.shapes:
        jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3)
        color = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[s.color], jitter, strict=True))
        mask = Image.new("L", (image_size * ss, image_size * ss), 0)
        method, xy = _outline(s, ss)
        getattr(ImageDraw.Draw(mask), method)(xy, fill=255)
        img.paste(color, (0, 0, image_size, image_size), mask.reduce(ss))
    return img


def _where(cell: str) -> str:
    if cell == "center":
        return "in the center"
    if cell in ("left", "right"):
        return f"on the {cell}"
    return f"at the {cell}"


def caption_for(scene: SceneSpec) -> str:
    """A caption naming every shape (size, colour, kind, place) in grid reading order + background."""
    parts = [f"a {s.size} {s.color} {s.kind} {_where(s.cell)}" for s in scene.shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on a {scene.background} background"


def _candidates(scene: SceneSpec, r: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Every distinct question per type, shuffled; "exists" alternates yes/no from a coin flip.

    "no" questions are hard negatives: a present kind in another colour, or a present colour on
    another kind, so the answer cannot be read off the question's words (every colour/kind pair
    is as likely to be asked with answer yes as with answer no).
    """
    present = {(s.color, s.kind) for s in scene.shapes}
    out: dict[str, list[tuple[str, str]]] = {
        "color": [(f"what color is the {s.kind}?", s.color) for s in scene.shapes],
        "shape": [(f"what shape is {s.color}?", s.kind) for s in scene.shapes],
        "count": [("how many shapes are there?", str(len(scene.shapes)))],
        "size": [(f"is the {s.kind} large or small?", s.size) for s in scene.shapes],
    }
    yes = [(f"is there a {c} {k}?", "yes") for c, k in sorted(present)]
    hard = sorted(
        {(c, s.kind) for s in scene.shapes for c in COLORS}
        | {(s.color, k) for s in scene.shapes for k in SHAPES}
    )
    no = [(f"is there a {c} {k}?", "no") for c, k in hard if (c, k) not in present]
    for pool in (*out.values(), yes, no):
        r.shuffle(pool)
    first, second = (yes, no) if r.random() < 0.5 else (no, yes)
    exists = [q for pair in zip(first, second, strict=False) for q in pair]
    paired = min(len(first), len(second))
    exists += first[paired:] + second[paired:]
    out["exists"] = exists
    return out


def questions_for(scene: SceneSpec, rng: RandomLike, n: int) -> list[tuple[str, str]]:
    """``n`` distinct (question, answer) pairs, spread over question types as evenly as possible.

    Types are visited round-robin in a seeded order, so with the default n=4 every image gets
    four different types and, over the dataset, each type is equally common.
    """
    r = _as_random(rng)
    pools = _candidates(scene, r)
    available = sum(len(p) for p in pools.values())
    if n > available:
        raise ValueError(f"asked for {n} questions but this scene only has {available} distinct ones")
    order = list(QUESTION_TYPES)
    r.shuffle(order)
    picked: list[tuple[str, str]] = []
    while len(picked) < n:
        for t in order:
            if pools[t] and len(picked) < n:
                picked.append(pools[t].pop(0))
    return picked


def answer_vocabulary() -> list[str]:
    """Every possible answer, sorted: fixed, so label ids never depend on which samples were drawn."""
    return sorted({*COLORS, *SHAPES, *COUNTS, "yes", "no", *SIZES})


def _image_rng(seed: int, index: int, stream: str) -> random.Random:
    # String seeds hash with SHA-512 inside ``random``: stable across processes and platforms.
    return random.Random(f"mmfusion-demo/{seed}/{index}/{stream}")


def _assign_splits(config: DemoConfig) -> list[str]:
    n = config.n_images
    n_train = round(config.split_fractions[0] * n)
    n_val = min(n - n_train, round(config.split_fractions[1] * n))
    names = ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)
    order = list(range(n))
    random.Random(f"mmfusion-demo/{config.seed}/splits").shuffle(order)
    splits = [""] * n
    for name, idx in zip(names, order, strict=True):
        splits[idx] = name
    return splits


def _is_current(meta_file: Path, config: DemoConfig, paths: DemoDatasetPaths) -> bool:
    if not meta_file.is_file() or not all(p.is_file() for p in (paths.qa, paths.captions, paths.labels)):
        return False
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("format_version") == FORMAT_VERSION and meta.get("config") == config.to_dict()


def _write_jsonl(path: Path, records: Sequence[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def generate_demo_dataset(
    out_dir: Path, config: DemoConfig = DemoConfig(), progress: bool = True
) -> DemoDatasetPaths:
    """Render the demo dataset into ``out_dir`` (images/, qa.jsonl, captions.jsonl, labels.txt, demo.json).

    Idempotent: when ``demo.json`` already records this config, nothing is rendered again.
    ``demo.json`` is written last, so an interrupted run is redone rather than trusted.
    """
    root = Path(out_dir)
    paths = DemoDatasetPaths(
        root=root, qa=root / "qa.jsonl", captions=root / "captions.jsonl", labels=root / "labels.txt"
    )
    meta_file = root / "demo.json"
    if _is_current(meta_file, config, paths):
        return paths
    meta_file.unlink(missing_ok=True)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(config.n_images - 1)))
    splits = _assign_splits(config)
    qa: list[dict[str, str]] = []
    captions: list[dict[str, str]] = []
    for i in tqdm(range(config.n_images), desc="demo images", unit="img", disable=not progress):
        scene = sample_scene(_image_rng(config.seed, i, "scene"), config.image_size)
        rel = f"images/{i:0{width}d}.png"
        render_scene(scene, config.image_size).save(root / rel, format="PNG", compress_level=1)
        captions.append({"image": rel, "text": caption_for(scene), "split": splits[i]})
        for question, answer in questions_for(
            scene, _image_rng(config.seed, i, "questions"), config.questions_per_image
        ):
            qa.append({"image": rel, "text": question, "label": answer, "split": splits[i]})
    # Drop images left over from an earlier, larger run so the folder matches the manifests.
    keep = {f"{i:0{width}d}.png" for i in range(config.n_images)}
    for stale in image_dir.iterdir():
        if re.fullmatch(r"\d{5,}\.png", stale.name) and stale.name not in keep:
            stale.unlink()
    _write_jsonl(paths.qa, qa)
    _write_jsonl(paths.captions, captions)
    paths.labels.write_text("".join(f"{a}\n" for a in answer_vocabulary()), encoding="utf-8")
    meta = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "counts": {
            "images": config.n_images,
            "questions": len(qa),
            "captions": len(captions),
            "images_per_split": dict(Counter(splits)),
            "questions_per_split": dict(Counter(r["split"] for r in qa)),
            "answers": dict(sorted(Counter(r["label"] for r in qa).items())),
        },
    }
    meta_file.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return paths
