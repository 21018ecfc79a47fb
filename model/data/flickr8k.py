"""Flickr8k, read from the dataset's own layout (no conversion step, no manifest to write).

Layout of the official archives, unpacked into one root folder::

    root/
      Flickr8k.token.txt          <image>.jpg#<n>\\t<caption>   (five captions per image)
      Flickr_8k.trainImages.txt   one image file name per line (6000)
      Flickr_8k.devImages.txt     (1000; this is our "val" split)
      Flickr_8k.testImages.txt    (1000)
      Flicker8k_Dataset/          the JPEGs ("Flicker" sic: the archive's own spelling;
                                  the correctly spelled Flickr8k_Dataset/ is accepted too)

Two products:

* retrieval pairs: every (image, caption) of an image in a split, as ``Row``s with ``label=None``;
  they train and evaluate the contrastive head.
* image-text matching, a two-class classification task derived from the pairs: each caption
  once with its own image ("match") and once with a different image of the *same* split
  ("mismatch"), the latter drawn with a seeded RNG. Same-split negatives keep evaluation images
  out of training; the task needs both modalities by construction (neither the caption nor the
  image alone says whether they belong together). Random negatives are occasionally plausible
  for the caption (Flickr8k has many "a dog runs on grass" images): that label noise is inherent
  to the task and is the same for every model compared on it.

The real token file lists captions of a few images that are in no split file (and, for
``2258277193_586949ec62.jpg.1``, not on disk either): those are ignored and counted in the
summary, not treated as errors.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from model.data.rows import SPLITS, DatasetError, Issues, Row, unreadable_images

TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES: dict[str, str] = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
IMAGE_DIRS: tuple[str, ...] = ("Flicker8k_Dataset", "Flickr8k_Dataset")
"""The archive's own (misspelled) folder name first; the corrected spelling is accepted too."""
MATCH, MISMATCH = "match", "mismatch"
MATCH_LABELS: list[str] = [MATCH, MISMATCH]


def _expected_layout() -> str:
    names = [TOKEN_FILE, *SPLIT_FILES.values(), f"{IMAGE_DIRS[0]}/"]
    return ", ".join(names)


def is_flickr8k_root(path: Path) -> bool:
    """True when the folder holds any part of the Flickr8k layout.

    Any part (not all) so that a half-unpacked folder is routed to ``load_flickr8k``, whose error
    then names exactly which of the expected files is missing.
    """
    path = Path(path)
    names = [TOKEN_FILE, *SPLIT_FILES.values()]
    return path.is_dir() and (any((path / n).is_file() for n in names) or any((path / d).is_dir() for d in IMAGE_DIRS))


@dataclass(frozen=True)
class Flickr8kSummary:
    """What was loaded and what was left out, so nothing is dropped silently."""

    images: dict[str, int]
    """Images with at least one caption, per split."""
    captions: dict[str, int]
    """Captions (retrieval pairs), per split."""
    captions_outside_splits: int
    """Captions whose image is in no split file: ignored."""
    images_outside_splits: int
    """Distinct images behind ``captions_outside_splits``."""
    split_images_without_captions: int
    """Images listed in a split file that have no caption in the token file: unused."""

    def describe(self) -> str:
        per_split = ", ".join(f"{s} {self.images[s]} images / {self.captions[s]} captions" for s in SPLITS)
        text = f"Flickr8k: {per_split}"
        if self.captions_outside_splits:
            text += (
                f"; ignored {self.captions_outside_splits} captions of {self.images_outside_splits} images"
                " that are in no split file"
            )
        if self.split_images_without_captions:
            text += f"; {self.split_images_without_captions} split-listed images have no caption (unused)"
        return text


@dataclass(frozen=True)
class Flickr8k:
    root: Path
    image_dir: Path
    pairs: list[Row]
    """Retrieval pairs (image, caption, label None, split), in token-file order."""
    summary: Flickr8kSummary

    def matching_rows(self, seed: int = 0) -> list[Row]:
        return matching_rows(self.pairs, seed=seed)


def _read_text(path: Path) -> list[str]:
    # errors="replace": one odd byte in one caption must not make 40k captions unusable.
    return path.read_text(encoding="utf-8-sig", errors="replace").splitlines()


def _parse_tokens(path: Path, issues: Issues) -> list[tuple[int, str, str]]:
    """(line number, image file name, caption) for every well-formed line."""
    out: list[tuple[int, str, str]] = []
    kind = f"malformed lines in {TOKEN_FILE}"
    for n, raw in enumerate(_read_text(path), start=1):
        if not raw.strip():
            continue
        name_part, tab, caption = raw.partition("\t")
        image, hash_, index = name_part.strip().rpartition("#")
        if not tab:
            issues.add(kind, f"line {n}: no tab between '<image>#<n>' and the caption", "line")
        elif not hash_ or not image or not index.isdigit():
            issues.add(kind, f"line {n}: {name_part.strip()!r} is not '<image>#<n>'", "line")
        elif not caption.strip():
            issues.add(kind, f"line {n}: empty caption", "line")
        else:
            out.append((n, image, caption.strip()))
    return out


def _found_elsewhere(root: Path, missing: list[str]) -> str:
    """Where the missing pieces are, when an unpacked archive put them one or two folders deeper (the
    official zips unpack to Flickr8k_text/ and Flickr8k_Dataset/Flicker8k_Dataset/)."""
    found = []
    for name in missing:
        wanted = name.rstrip("/")
        hits = [p for p in root.glob(f"*/{wanted}")] + [p for p in root.glob(f"*/*/{wanted}")]
        hits = [p for p in hits if p.is_dir() == name.endswith("/")]
        if hits:
            found.append(f"{name} is at {hits[0].relative_to(root)}")
    if not found:
        return ""
    return ("; found: " + ", ".join(found) + ". Move them up to the folder's top level (the token and split "
            "files next to the image folder), or point --data at the folder that holds them all")


def load_flickr8k(root: Path, *, verify_images: bool = True) -> Flickr8k:
    """Read and validate a Flickr8k folder; raise one ``DatasetError`` listing every problem.

    Errors: missing expected files (named), malformed token lines (line numbers), images in a
    split file but not on disk or unreadable (how many, which), an image in two split files.
    Not errors (counted in ``summary``): captions of images in no split, split images without captions.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; expected a Flickr8k folder holding {_expected_layout()}")
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), root / IMAGE_DIRS[0])
    missing = [n for n in [TOKEN_FILE, *SPLIT_FILES.values()] if not (root / n).is_file()]
    if not image_dir.is_dir():
        missing.append(f"{IMAGE_DIRS[0]}/")
    if missing:
        raise DatasetError(
            f"{root}: not a complete Flickr8k folder; missing {len(missing)} of the expected files: "
            f"{', '.join(missing)} (expected: {_expected_layout()}){_found_elsewhere(root, missing)}"
        )

    issues = Issues()
    split_of: dict[str, str] = {}
    listed_in: dict[str, list[str]] = defaultdict(list)
    where: dict[str, str] = {}
    for split, fname in SPLIT_FILES.items():
        for n, raw in enumerate(_read_text(root / fname), start=1):
            name = raw.strip()
            if not name:
                continue
            if split not in listed_in[name]:
                listed_in[name].append(split)
            split_of.setdefault(name, split)
            where.setdefault(name, f"{fname} line {n}")
    for name, splits in listed_in.items():
        if len(splits) > 1:
            issues.add("images listed in more than one split file", f"{name}: {', '.join(splits)}", "image")

    on_disk = {p.name for p in image_dir.iterdir() if p.is_file()}
    absent = [name for name in split_of if name not in on_disk]
    kind = f"images listed in a split file but missing from {image_dir.name}/"
    for name in absent:
        issues.add(kind, f"{where[name]}: {name}", "image")

    tokens = _parse_tokens(root / TOKEN_FILE, issues)
    if verify_images:
        present = sorted(image_dir / name for name in split_of if name in on_disk)
        for p, reason in unreadable_images(present).items():
            issues.add("unreadable images", f"{p.name} ({where[p.name]}): {reason}", "image")
    if issues:
        raise issues.error(f"{root}: the Flickr8k folder has problems:")

    pairs: list[Row] = []
    outside: Counter[str] = Counter()
    for _, name, caption in tokens:
        split = split_of.get(name)
        if split is None:
            outside[name] += 1
            continue
        pairs.append(Row(image_dir / name, caption, None, split))
    with_captions = {r.image.name for r in pairs}
    summary = Flickr8kSummary(
        images={s: len({r.image for r in pairs if r.split == s}) for s in SPLITS},
        captions={s: sum(1 for r in pairs if r.split == s) for s in SPLITS},
        captions_outside_splits=sum(outside.values()),
        images_outside_splits=len(outside),
        split_images_without_captions=sum(1 for name in split_of if name not in with_captions),
    )
    if not pairs:
        raise DatasetError(f"{root}: no caption in {TOKEN_FILE} belongs to an image in the split files")
    return Flickr8k(root, image_dir, pairs, summary)


def matching_rows(pairs: list[Row], *, seed: int = 0) -> list[Row]:
    """Image-text matching rows: per caption a "match" row and a same-split "mismatch" row.

    The negative image is uniform over the split's *other* images (never the caption's own), from
    a ``random.Random`` seeded by a string, which is stable across Python runs and hash seeds. Rows
    come in pair order, positive then negative, so the output is a pure function of (pairs, seed).
    """
    images_by_split: dict[str, list[Path]] = {}
    for s in SPLITS:
        images_by_split[s] = sorted({r.image for r in pairs if r.split == s})
    too_small = [f"{s} ({len(v)} image)" for s, v in images_by_split.items() if len(v) == 1]
    if too_small:
        raise DatasetError(
            f"a mismatch negative needs another image of the same split, but these splits have only one: "
            f"{', '.join(too_small)}"
        )
    position = {s: {p: i for i, p in enumerate(v)} for s, v in images_by_split.items()}
    rng = random.Random(f"mmfusion/flickr8k-matching/{seed}")
    out: list[Row] = []
    for r in pairs:
        images = images_by_split[r.split]
        j = rng.randrange(len(images) - 1)
        if j >= position[r.split][r.image]:
            j += 1  # skip the caption's own image: uniform over the others
        out.append(Row(r.image, r.text, MATCH, r.split))
        out.append(Row(images[j], r.text, MISMATCH, r.split))
    return out
