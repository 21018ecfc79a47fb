"""Resolve a TrainConfig's ``data`` into classification rows, caption rows and the label list.

``cfg.data`` is one of:

* ``"demo"``: the built-in generator (visual question answering + one caption per image);
* a CSV/JSONL manifest of (image, text, label[, split]) rows, with ``cfg.captions`` an optional
  second manifest of (image, text[, split]) caption pairs for the contrastive head;
* a folder in the Flickr8k layout (see ``model.data.flickr8k``): image-text matching rows
  ("match"/"mismatch") for classification and all five captions per image for retrieval.

Dataset randomness that defines *evaluation sets* (automatic manifest splits, Flickr8k mismatch
negatives) is seeded with the fixed ``DATA_SEED``, not ``cfg.seed``: runs that differ only in
their training seed must be scored on the same val/test rows to be comparable.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from model.config import TrainConfig
from model.data.flickr8k import MATCH_LABELS, TOKEN_FILE, Flickr8k, is_flickr8k_root, load_flickr8k
from model.data.rows import SPLITS, DatasetError, Row, load_rows

DATA_SEED = 0
"""Seed of the dataset-level randomness (see the module docstring for why it is not cfg.seed)."""

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    rows: list[Row]
    """Classification rows (image, text, label, split)."""
    captions: list[Row]
    """Caption rows for the contrastive head (may be empty)."""
    labels: list[str]
    image_paths: list[Path]
    """Every distinct image, in a stable order; models index images by position here."""
    summary: str = ""
    """One human-readable line: what was loaded per split, and anything that was left out."""

    def __post_init__(self) -> None:
        self.image_index = {p: i for i, p in enumerate(self.image_paths)}

    def split(self, name: str) -> list[Row]:
        return [r for r in self.rows if r.split == name]

    def caption_split(self, name: str) -> list[Row]:
        return [r for r in self.captions if r.split == name]


def _split_counts(rows: list[Row]) -> str:
    return ", ".join(f"{s} {sum(1 for r in rows if r.split == s)}" for s in SPLITS)


def _check_split_agreement(rows: list[Row], captions: list[Row], captions_file: str) -> None:
    """An image in the QA val split but the caption train split would leak evaluation images."""
    split_of = {r.image: r.split for r in rows}
    clashes = sorted({(r.image, split_of[r.image], r.split) for r in captions
                      if r.image in split_of and split_of[r.image] != r.split})
    if clashes:
        shown = "\n  ".join(f"{img}: {a} in the rows, {b} in the captions" for img, a, b in clashes[:20])
        more = f"\n  ... and {len(clashes) - 20} more" if len(clashes) > 20 else ""
        raise DatasetError(
            f"{len(clashes)} {'image is' if len(clashes) == 1 else 'images are'} in different splits "
            f"in the data manifest and in {captions_file} "
            f"(evaluation images would be trained on); give both files the same 'split' column:\n  {shown}{more}"
        )


def _manifest(cfg: TrainConfig) -> PreparedData:
    path = Path(cfg.data)
    rows = load_rows(path, seed=DATA_SEED)
    labels = sorted({r.label for r in rows if r.label is not None})
    captions: list[Row] = []
    if cfg.captions:
        captions = load_rows(Path(cfg.captions), require_label=False, seed=DATA_SEED)
        _check_split_agreement(rows, captions, cfg.captions)
    summary = f"{path.name}: rows {_split_counts(rows)}"
    if captions:
        summary += f"; captions {_split_counts(captions)}"
    return _assemble(rows, captions, labels, summary)


def flickr8k_task(root: Path) -> tuple[Flickr8k, list[Row]]:
    """A Flickr8k folder and its image-text matching rows (the classification task), drawn with the seed
    training uses: evaluation and verification of a bundle see the very rows its run was trained on."""
    ds = load_flickr8k(Path(root))
    return ds, ds.matching_rows(seed=DATA_SEED)


def _flickr8k(cfg: TrainConfig) -> PreparedData:
    if cfg.captions:
        raise DatasetError(
            f"{cfg.data} is a Flickr8k folder, which brings its own captions ({TOKEN_FILE}); "
            f"do not also give captions={cfg.captions!r}"
        )
    ds, rows = flickr8k_task(Path(cfg.data))
    summary = f"{ds.summary.describe()}; matching rows {_split_counts(rows)}"
    return _assemble(rows, ds.pairs, list(MATCH_LABELS), summary)


def _assemble(rows: list[Row], captions: list[Row], labels: list[str], summary: str) -> PreparedData:
    seen: dict[Path, None] = {}
    for r in [*rows, *captions]:
        seen.setdefault(r.image, None)
    return PreparedData(rows, captions, labels, list(seen), summary)


def prepare_data(cfg: TrainConfig, progress: bool = True) -> PreparedData:
    """Load and validate ``cfg.data``; every problem surfaces here as a ``DatasetError``."""
    path = Path(cfg.data)
    if cfg.data == "demo":
        from model.data.demo import DemoConfig, generate_demo_dataset

        demo = DemoConfig(n_images=cfg.demo_images, image_size=cfg.demo_image_size, seed=cfg.seed)
        paths = generate_demo_dataset(Path(cfg.demo_dir), demo, progress=progress)
        labels = [x for x in Path(paths.labels).read_text(encoding="utf-8").split("\n") if x]
        rows = load_rows(Path(paths.qa), labels=labels)
        captions = load_rows(Path(paths.captions), require_label=False)
        data = _assemble(rows, captions, labels, f"demo: rows {_split_counts(rows)}")
    elif path.is_dir():
        if not is_flickr8k_root(path):
            raise DatasetError(
                f"{path} is a folder without the Flickr8k layout (expected {TOKEN_FILE}, "
                "Flickr_8k.trainImages.txt, Flickr_8k.devImages.txt, Flickr_8k.testImages.txt and "
                "Flicker8k_Dataset/); for other data give a CSV/JSONL manifest, or 'demo'"
            )
        data = _flickr8k(cfg)
    elif not path.exists():
        raise DatasetError(f"data {cfg.data!r} does not exist; give 'demo', a CSV/JSONL manifest or a Flickr8k folder")
    else:
        data = _manifest(cfg)
    if len(data.labels) < 2:
        raise DatasetError(f"need at least 2 distinct labels, found {data.labels}")
    if not data.split("train"):
        raise DatasetError(f"no training rows ({data.summary}); put some rows in the 'train' split")
    log.info("%s", data.summary)
    if progress:
        print(data.summary, file=sys.stderr)
    return data
