"""Dataset manifests (CSV or JSONL rows of image, text, label, split) -> validated rows.

Bad rows are collected over the whole file and reported together, grouped by kind (how many,
and which lines), so a user fixes their data in one pass instead of one exception at a time.
Every image a manifest names is also opened once (header read + Pillow ``verify``), so a corrupt
file fails here, with its line numbers, instead of as a bare ``OSError`` deep inside training.

Manifest format
  CSV: a header row with ``image`` and ``text`` columns, ``label`` (required unless
  ``require_label=False``) and optionally ``split``. JSONL: one JSON object per line with the
  same keys. Image paths are resolved relative to the manifest's folder. ``split`` is one of
  ``train``, ``val``, ``test``.

Splits when the manifest has none
  If *no* row names a split, every image gets a seeded, deterministic split: about 80/10/10
  (``AUTO_SPLIT_FRACTIONS``) decided by a hash of ``(seed, image path as written)``. All rows of
  one image land in the same split (no image leaks from training into evaluation); a QA manifest
  and a caption manifest that name the same image the same way agree on its split; and adding
  images to a dataset never moves the existing ones. The price: the shares are only approximately
  80/10/10, so a tiny dataset (tens of images) may get an empty ``val`` or ``test`` split — give
  explicit splits there. If only *some* rows name a split, the others get ``default_split``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from model.errors import UserError

SPLITS = ("train", "val", "test")
AUTO_SPLIT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
MAX_LISTED = 20
"""Entries shown per kind of problem; the count always covers all of them."""

log = logging.getLogger(__name__)


class DatasetError(UserError, ValueError):
    """A dataset that cannot be used as given; the message lists the offending rows.

    ``issues`` maps each kind of problem to *all* its entries (the message shows the first
    ``MAX_LISTED`` of each), for callers that want to act on them programmatically.
    """

    def __init__(self, message: str, issues: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.issues: dict[str, list[str]] = issues or {}


@dataclass(frozen=True)
class Row:
    image: Path
    text: str
    label: str | None
    split: str


class Issues:
    """Problems collected while reading a dataset, grouped by kind, rendered as one message."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[str]] = {}
        self.units: dict[str, str] = {}
        self.counts: dict[str, str] = {}

    def add(self, kind: str, entry: str, unit: str = "row") -> None:
        """Record one offending row (or line, image: ``unit`` names what the count counts)."""
        self.by_kind.setdefault(kind, []).append(entry)
        self.units.setdefault(kind, unit)

    def set_count(self, kind: str, count: str) -> None:
        """Override the default '<n> rows' count shown for a kind (e.g. '2 images, 3 rows')."""
        self.counts[kind] = count

    def __bool__(self) -> bool:
        return bool(self.by_kind)

    def render(self, head: str) -> str:
        parts = [head]
        for kind, entries in self.by_kind.items():
            parts.append(f"  {kind} ({self.counts.get(kind, _plural(len(entries), self.units[kind]))}):")
            parts.extend(f"    {e}" for e in entries[:MAX_LISTED])
            if len(entries) > MAX_LISTED:
                parts.append(f"    ... and {len(entries) - MAX_LISTED} more")
        return "\n".join(parts)

    def error(self, head: str) -> DatasetError:
        return DatasetError(self.render(head), {k: list(v) for k, v in self.by_kind.items()})


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _lines(numbers: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(n) for n in numbers[:limit])
    more = f", ... (+{len(numbers) - limit})" if len(numbers) > limit else ""
    return f"{'line' if len(numbers) == 1 else 'lines'} {shown}{more}"


def unreadable_images(paths: Iterable[Path]) -> dict[Path, str]:
    """Images Pillow cannot identify, or cannot decode to the end -> the reason.

    ``verify`` checks a PNG's chunk CRCs but not a JPEG's data: a truncated JPEG passed it and then
    stopped training with "image file is truncated". So each image is also decoded, JPEGs in draft
    mode (libjpeg's 1/8 scale still reads every entropy-coded byte, so truncation is found, at about
    a tenth of a full decode): cheap enough to run on every image before a long training run starts.
    """
    bad: dict[Path, str] = {}
    for p in paths:
        try:
            with Image.open(p) as img:
                img.verify()
            with Image.open(p) as img:  # verify() leaves the image unusable: open again to decode
                if img.format in ("JPEG", "MPO"):
                    img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
        except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...)
            bad[p] = f"{type(exc).__name__}: {exc}"
    return bad


def auto_split(key: str, seed: int = 0, fractions: Sequence[float] = AUTO_SPLIT_FRACTIONS) -> str:
    """The split of one image, from a hash of (seed, key): stable across runs, machines and files."""
    digest = hashlib.sha256(f"mmfusion-split/{seed}/{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, share in zip(SPLITS, fractions, strict=True):
        edge += share
        if u < edge:
            return name
    return SPLITS[-1]


def _split_key(image: str) -> str:
    """The image as written, normalised so 'a\\b.jpg', './a/b.jpg' and 'a/b.jpg' hash alike."""
    key = image.replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


Record = tuple[int, dict[str, object]]


def _read_csv(path: Path, required: list[str], issues: Issues) -> list[Record]:
    with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's BOM must not rename 'image'
        reader = csv.DictReader(fh)
        header = reader.fieldnames
        if not header:
            raise DatasetError(f"{path}: empty file; expected a header row with columns {','.join(required)}[,split]")
        names = [(h or "").strip().lower() for h in header]
        missing = [c for c in required if c not in names]
        if missing:
            raise DatasetError(
                f"{path}: the CSV header is missing column(s) {missing}; found {list(header)}. "
                f"Expected columns: {', '.join(required)} (and optionally split)"
            )
        reader.fieldnames = names
        records: list[Record] = []
        for rec in reader:
            line = reader.line_num
            if None in rec:
                issues.add("malformed lines", f"line {line}: {len(rec[None])} more field(s) than the header", "line")  # type: ignore[index]
                continue
            records.append((line, dict(rec)))
        return records


def _read_jsonl(path: Path, issues: Issues) -> list[Record]:
    records: list[Record] = []
    # JSON Lines ends records at "\n" only: str.splitlines would also split inside strings holding U+2028,
    # U+2029 or U+0085 (valid JSON, common in scraped captions) and misnumber every later line.
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            issues.add("malformed lines", f"line {n}: not valid JSON ({exc.msg} at column {exc.colno})", "line")
            continue
        if not isinstance(rec, dict):
            issues.add("malformed lines", f"line {n}: expected a JSON object, got {type(rec).__name__}", "line")
            continue
        records.append((n, {str(k).strip().lower(): v for k, v in rec.items()}))
    return records


def _field(rec: dict[str, object], name: str) -> str:
    value = rec.get(name)
    return "" if value is None else str(value).strip()


def load_rows(
    path: Path,
    *,
    require_label: bool = True,
    labels: list[str] | None = None,
    default_split: str = "train",
    seed: int = 0,
    verify_images: bool = True,
) -> list[Row]:
    """Read and validate a manifest; raise one ``DatasetError`` listing every bad row.

    ``labels``: when given, any other label is an error. ``default_split``: the split of rows
    without one when other rows do name theirs (see the module docstring for manifests without any
    split; ``seed`` seeds that assignment). ``verify_images``: open every distinct image once.
    """
    path = Path(path)
    if default_split not in SPLITS:
        raise ValueError(f"default_split must be one of {SPLITS}, got {default_split!r}")
    if not path.is_file():
        raise DatasetError(f"dataset manifest {path} does not exist")
    suffix = path.suffix.lower()
    issues = Issues()
    required = ["image", "text", "label"] if require_label else ["image", "text"]
    try:
        if suffix == ".csv":
            records = _read_csv(path, required, issues)
        elif suffix in (".jsonl", ".ndjson"):
            records = _read_jsonl(path, issues)
        else:
            raise DatasetError(f"dataset manifest {path} must be .csv or .jsonl (got {suffix or 'no extension'})")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None

    any_split = any(_field(rec, "split") for _, rec in records)
    defaulted: list[int] = []  # lines without a split when others have one
    base = path.parent
    parsed: list[tuple[int, Path, str, str | None, str]] = []
    bad_lines: set[int] = set()
    unknown: dict[str, list[int]] = defaultdict(list)
    for line, rec in records:
        # JSONL values: strings, or numbers for a label; str() of a list or an object silently trained on
        # "['what', 'color']" or made a class named "{'c': 1}".
        odd = [f"{name} is {type(rec[name]).__name__}" for name in ("image", "text", "label", "split")
               if isinstance(rec.get(name), bool | list | dict)]
        if odd:
            issues.add("value that is not text", f"line {line}: " + ", ".join(odd))
            bad_lines.add(line)
            continue
        image, text, split = _field(rec, "image"), _field(rec, "text"), _field(rec, "split").lower()
        label = _field(rec, "label") or None
        ok = True
        if not image:
            issues.add("empty 'image'", f"line {line}")
            ok = False
        if not text:
            issues.add("empty 'text'", f"line {line}" + (f": {image}" if image else ""))
            ok = False
        if require_label and label is None:
            issues.add("empty 'label'", f"line {line}")
            ok = False
        if label is not None and label.splitlines() != [label]:
            # labels.txt holds one label per line, so a label with a line break cannot round-trip the bundle.
            issues.add("label with a line break", f"line {line}: {label!r}")
            ok = False
        if split and split not in SPLITS:
            issues.add(f"bad split (must be one of {', '.join(SPLITS)})", f"line {line}: {split!r}")
            ok = False
        if labels is not None and label is not None and label not in labels:
            unknown[label].append(line)
            issues.add("unknown label", f"line {line}: {label!r}")
            ok = False
        if not ok:
            bad_lines.add(line)
        if not image:
            continue
        if not split:
            split = auto_split(_split_key(image), seed) if not any_split else default_split
            if any_split:
                defaulted.append(line)
        if "\\" in image and not (base / image).exists() and (base / image.replace("\\", "/")).exists():
            image = image.replace("\\", "/")  # a manifest written on Windows (a backslash as separator)
        img_path = Path(image) if Path(image).is_absolute() else (base / image).resolve()
        parsed.append((line, img_path, text, label, split))
    if unknown:
        shown = ", ".join(repr(x) for x in sorted(unknown)[:MAX_LISTED])
        known = labels if labels is not None and len(labels) <= MAX_LISTED else f"{len(labels or [])} labels"
        issues.set_count("unknown label", f"{_plural(sum(map(len, unknown.values())), 'row')}; {shown}; known: {known}")

    lines_of: dict[Path, list[int]] = defaultdict(list)
    splits_of: dict[Path, set[str]] = defaultdict(set)
    for line, img_path, _text, _label, split in parsed:
        lines_of[img_path].append(line)
        splits_of[img_path].add(split)
    for img_path, splits in splits_of.items():
        if len(splits) > 1:  # a picture trained on and then tested on: the held-out metrics would flatter
            issues.add("image in two splits", f"{_display(img_path, base)} ({_lines(lines_of[img_path])}): "
                       f"{', '.join(s for s in SPLITS if s in splits)}")
            bad_lines.update(lines_of[img_path])
    present = [p for p in lines_of if p.is_file()]
    present_set = set(present)
    for line, img_path, *_ in parsed:
        if img_path not in present_set:
            issues.add("missing image file", f"line {line}: {_display(img_path, base)}")
            bad_lines.add(line)
    if verify_images:
        broken = unreadable_images(present)
        for p, reason in broken.items():
            issues.add("unreadable image", f"{_display(p, base)} ({_lines(lines_of[p])}): {reason}")
            bad_lines.update(lines_of[p])
        if broken:
            n_rows = sum(len(lines_of[p]) for p in broken)
            issues.set_count("unreadable image", f"{_plural(len(broken), 'image')}, {_plural(n_rows, 'row')}")
    if issues:
        n_malformed = len(issues.by_kind.get("malformed lines", []))
        n_bad = len(bad_lines) + n_malformed
        hint = ""
        if "missing image file" in issues.by_kind:  # the usual cause: paths written relative to the shell's folder
            hint = f" (relative image paths are read from the manifest's folder, {base.resolve()})"
        raise issues.error(f"{path}: {n_bad} of {len(records) + n_malformed} rows are unusable{hint}:")
    if not parsed:
        raise DatasetError(f"{path}: no rows (expected columns {', '.join(required)}[, split])")
    if not any_split:
        counts = {s: len({p for _, p, _, _, sp in parsed if sp == s}) for s in SPLITS}
        log.info("%s has no 'split' column: assigned images by seeded hash (seed %d): %s", path, seed, counts)
    elif defaulted:
        log.warning("%s: %d row(s) have no split while others do; they go to %s (%s). Fill the column, or leave "
                    "it empty everywhere for a seeded per-image split", path, len(defaulted), default_split,
                    _lines(defaulted))
    return [Row(img_path, text, label, split) for _, img_path, text, label, split in parsed]


def _display(p: Path, base: Path) -> str:
    try:
        return p.relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(p)
