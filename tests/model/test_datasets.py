"""Dataset loaders: manifests (CSV/JSONL), the Flickr8k layout, and ``prepare_data`` dispatch.

Every tree is built in ``tmp_path`` in the real on-disk layout, with real JPEG/PNG files written
by Pillow, so the loaders are exercised exactly as they are on user data.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from model.config import TrainConfig
from model.data.flickr8k import (
    MATCH,
    MATCH_LABELS,
    MISMATCH,
    SPLIT_FILES,
    TOKEN_FILE,
    is_flickr8k_root,
    load_flickr8k,
    matching_rows,
)
from model.data.prepared import prepare_data
from model.data.rows import SPLITS, DatasetError, Row, auto_split, load_rows

# ---------------------------------------------------------------- helpers


def write_image(path: Path, index: int, fmt: str = "JPEG", size: tuple[int, int] = (40, 30)) -> Path:
    """A small real image whose colour depends on ``index`` (distinct images, distinct bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    color = ((37 * index) % 256, (91 * index + 40) % 256, (53 * index + 90) % 256)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[dict[str, str] | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


FLICKR_SPLITS = {"train": 8, "val": 3, "test": 3}
CAPTIONS_PER_IMAGE = 5


def flickr_name(i: int) -> str:
    return f"{1000268201 + i * 7919}_{i:04x}ab.jpg"


def build_flickr8k(root: Path, splits: dict[str, int] | None = None, extra_token_lines: list[str] | None = None,
                   outside_images: int = 1) -> dict[str, list[str]]:
    """A tiny Flickr8k tree in the archive's own layout; returns split -> image names.

    ``outside_images`` images have captions (and files) but are in no split file, like the
    real token file's stray entries.
    """
    splits = splits or FLICKR_SPLITS
    img_dir = root / "Flicker8k_Dataset"
    names: dict[str, list[str]] = {}
    i = 0
    token_lines: list[str] = []
    for split, n in splits.items():
        names[split] = []
        for _ in range(n):
            name = flickr_name(i)
            write_image(img_dir / name, i)
            names[split].append(name)
            words = ["dog", "girl", "bike", "beach", "ball", "tree", "car", "boat"]
            for c in range(CAPTIONS_PER_IMAGE):
                token_lines.append(f"{name}#{c}\tA {words[i % len(words)]} number {i} seen {c} times .")
            i += 1
    for _ in range(outside_images):
        name = flickr_name(i)
        write_image(img_dir / name, i)
        token_lines.extend(f"{name}#{c}\tAn image in no split {c} ." for c in range(CAPTIONS_PER_IMAGE))
        i += 1
    token_lines.extend(extra_token_lines or [])
    (root / TOKEN_FILE).write_text("\n".join(token_lines) + "\n", encoding="utf-8")
    for split, fname in SPLIT_FILES.items():
        (root / fname).write_text("\n".join(names.get(split, [])) + "\n", encoding="utf-8")
    return names


# ---------------------------------------------------------------- manifests


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for i in range(4):
        write_image(tmp_path / "images" / f"{i}.jpg", i)
    write_image(tmp_path / "images" / "4.png", 4, fmt="PNG")
    return tmp_path


def test_valid_csv_manifest_loads_rows_with_resolved_paths(images: Path) -> None:
    path = write_csv(images / "qa.csv", ["image", "text", "label", "split"], [
        ["images/0.jpg", "what is it?", "cat", "train"],
        ["images/4.png", "what is this?", "dog", "val"],
    ])
    rows = load_rows(path, labels=["cat", "dog"])
    assert rows == [
        Row((images / "images/0.jpg").resolve(), "what is it?", "cat", "train"),
        Row((images / "images/4.png").resolve(), "what is this?", "dog", "val"),
    ]


def test_csv_header_is_matched_despite_bom_case_and_spaces(images: Path) -> None:
    path = images / "qa.csv"
    path.write_text("\ufeffImage, Text ,LABEL\nimages/1.jpg,hello,cat\n", encoding="utf-8")
    assert load_rows(path)[0].text == "hello"


def test_csv_missing_column_names_the_missing_columns(images: Path) -> None:
    path = write_csv(images / "qa.csv", ["image", "caption", "label"], [["images/0.jpg", "x", "cat"]])
    with pytest.raises(DatasetError) as err:
        load_rows(path)
    msg = str(err.value)
    assert "missing column(s) ['text']" in msg
    assert "caption" in msg  # shows what the header does have


def test_csv_without_label_column_is_an_error_only_when_labels_are_required(images: Path) -> None:
    path = write_csv(images / "caps.csv", ["image", "text"], [["images/0.jpg", "a red square"]])
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['label'\]"):
        load_rows(path)
    assert load_rows(path, require_label=False)[0].label is None


def test_every_bad_row_is_reported_at_once_with_counts_and_line_numbers(images: Path) -> None:
    (images / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg body" * 3)
    path = write_csv(images / "qa.csv", ["image", "text", "label", "split"], [
        ["images/0.jpg", "fine", "cat", "train"],        # line 2
        ["images/nope.jpg", "missing file", "cat", "train"],  # line 3
        ["images/corrupt.jpg", "corrupt", "cat", "train"],    # line 4
        ["images/1.jpg", "unknown label", "zebra", "train"],  # line 5
        ["images/2.jpg", "   ", "cat", "train"],              # line 6
        ["images/3.jpg", "bad split", "dog", "holdout"],      # line 7
        ["images/corrupt.jpg", "corrupt again", "dog", "val"],  # line 8
        ["images/gone.png", "missing too", "dog", "test"],    # line 9
    ])
    with pytest.raises(DatasetError) as err:
        load_rows(path, labels=["cat", "dog"])
    msg = str(err.value)
    assert msg.startswith(f"{path}: 7 of 8 rows are unusable (relative image paths are read from the "
                          f"manifest's folder, {path.parent.resolve()}):")
    assert "missing image file (2 rows):" in msg
    assert "line 3: images/nope.jpg" in msg and "line 9: images/gone.png" in msg
    assert "unreadable image (1 image, 2 rows):" in msg
    assert "images/corrupt.jpg (lines 4, 8)" in msg
    assert "unknown label (1 row; 'zebra'; known: ['cat', 'dog']):" in msg
    assert "line 5: 'zebra'" in msg
    assert "empty 'text' (1 row):" in msg and "line 6: images/2.jpg" in msg
    assert "bad split (must be one of train, val, test) (1 row):" in msg and "line 7: 'holdout'" in msg
    assert "line 2" not in msg
    assert err.value.issues["missing image file"] == ["line 3: images/nope.jpg", "line 9: images/gone.png"]


def test_a_truncated_jpeg_is_refused_before_training_not_half_way(images: Path) -> None:
    from PIL import Image

    whole = images / "images" / "whole.jpg"
    Image.effect_noise((160, 120), 60).convert("RGB").save(whole, quality=90)
    data = whole.read_bytes()
    (images / "images" / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])  # headers intact, scan cut off
    path = write_csv(images / "qa.csv", ["image", "text", "label", "split"], [
        ["images/whole.jpg", "fine", "cat", "train"],
        ["images/cut.jpg", "cut off", "dog", "train"],  # line 3
    ])
    with pytest.raises(DatasetError, match=r"unreadable image \(1 image, 1 row\):\n    images/cut\.jpg \(line 3\)"):
        load_rows(path)


def test_jsonl_lists_objects_and_booleans_are_refused_not_stringified(images: Path) -> None:
    path = write_jsonl(images / "qa.jsonl", [
        {"image": "images/0.jpg", "text": "ok", "label": "cat"},
        {"image": "images/1.jpg", "text": ["what", "color"], "label": "cat"},
        {"image": "images/2.jpg", "text": "ok", "label": {"c": 1}},
        {"image": "images/3.jpg", "text": "ok", "label": True},
    ])
    with pytest.raises(DatasetError) as err:
        load_rows(path)
    msg = str(err.value)
    assert "value that is not text (3 rows):" in msg
    assert "line 2: text is list" in msg and "line 3: label is dict" in msg and "line 4: label is bool" in msg


def test_an_image_in_two_splits_of_one_manifest_is_refused_as_a_leak(images: Path) -> None:
    path = write_csv(images / "qa.csv", ["image", "text", "label", "split"], [
        ["images/0.jpg", "what is it?", "cat", "train"],
        ["images/1.jpg", "what is it?", "dog", "train"],
        ["images/0.jpg", "which animal?", "cat", "test"],  # line 4: the same picture, held out
    ])
    with pytest.raises(DatasetError, match=r"image in two splits \(1 row\):\n    images/0\.jpg \(lines 2, 4\): "
                                           r"train, test"):
        load_rows(path)


def test_windows_separators_are_read_and_rows_without_a_split_among_split_ones_are_warned_about(
        images: Path, caplog) -> None:
    path = write_csv(images / "qa.csv", ["image", "text", "label", "split"], [
        ["images\\0.jpg", "a", "cat", "train"],
        ["images\\1.jpg", "b", "dog", ""],  # line 3: no split while the others have one
        ["images/2.jpg", "c", "cat", "val"],
    ])
    with caplog.at_level("WARNING"):
        rows = load_rows(path)
    assert [r.image.name for r in rows] == ["0.jpg", "1.jpg", "2.jpg"]
    assert [r.split for r in rows] == ["train", "train", "val"]
    assert "1 row(s) have no split while others do; they go to train (line 3)" in caplog.text


def test_long_problem_lists_are_truncated_but_counted(images: Path) -> None:
    path = write_csv(images / "qa.csv", ["image", "text", "label"],
                     [[f"images/missing{i}.jpg", "q", "cat"] for i in range(25)])
    with pytest.raises(DatasetError) as err:
        load_rows(path)
    msg = str(err.value)
    assert "missing image file (25 rows):" in msg
    assert "line 21: images/missing19.jpg" in msg and "images/missing20.jpg" not in msg
    assert "... and 5 more" in msg
    assert len(err.value.issues["missing image file"]) == 25


def test_jsonl_malformed_lines_are_collected_with_the_other_problems(images: Path) -> None:
    path = write_jsonl(images / "qa.jsonl", [
        {"image": "images/0.jpg", "text": "ok", "label": "cat"},
        '{"image": "images/1.jpg", "text": "cut off',
        "",
        '["a", "list"]',
        {"image": "", "text": "no image", "label": "cat"},
        {"image": "images/2.jpg", "text": "no label"},
    ])
    with pytest.raises(DatasetError) as err:
        load_rows(path)
    msg = str(err.value)
    assert "malformed lines (2 lines):" in msg
    assert "line 2: not valid JSON" in msg
    assert "line 4: expected a JSON object, got list" in msg
    assert "empty 'image' (1 row):\n    line 5" in msg
    assert "empty 'label' (1 row):\n    line 6" in msg
    assert "4 of 5 rows are unusable" in msg


def test_jsonl_numbers_and_missing_split_use_defaults(images: Path) -> None:
    path = write_jsonl(images / "qa.jsonl", [
        {"image": "images/0.jpg", "text": "how many?", "label": 3, "split": "val"},
        {"image": "images/1.jpg", "text": "how many?", "label": 2},
    ])
    rows = load_rows(path, default_split="test")
    assert [(r.label, r.split) for r in rows] == [("3", "val"), ("2", "test")]


def test_jsonl_strings_may_hold_unicode_line_separators(images: Path) -> None:
    # json.dumps(ensure_ascii=False) writes U+2028/U+2029/U+0085 raw: valid JSON, one record per "\n".
    lines = [json.dumps(r, ensure_ascii=False) for r in (
        {"image": "images/0.jpg", "text": "line\u2028separator", "label": "cat"},
        {"image": "images/1.jpg", "text": "next\u0085line", "label": "dog"},
        {"image": "images/2.jpg", "text": "para\u2029graph", "label": "cat"},
    )]
    path = images / "qa.jsonl"
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    rows = load_rows(path)
    assert [r.text for r in rows] == ["line\u2028separator", "next\u0085line", "para\u2029graph"]


def test_a_label_with_a_line_break_is_refused_before_training(images: Path) -> None:
    path = write_jsonl(images / "qa.jsonl", [
        {"image": "images/0.jpg", "text": "ok", "label": "cat"},
        {"image": "images/1.jpg", "text": "two lines", "label": "x\u2028y"},
    ])
    with pytest.raises(DatasetError, match=r"label with a line break \(1 row\):\n    line 2"):
        load_rows(path)


def test_manifest_with_unsupported_extension_or_absent_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("image,text,label\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"must be \.csv or \.jsonl"):
        load_rows(tmp_path / "data.txt")
    with pytest.raises(DatasetError, match="does not exist"):
        load_rows(tmp_path / "nothing.csv")


def test_manifest_without_splits_gets_a_deterministic_per_image_split(tmp_path: Path) -> None:
    n_images = 200
    img = write_image(tmp_path / "one.png", 1, fmt="PNG")
    recs = [[f"images/{i:03d}.png", f"question {q}", "yes" if q else "no"] for i in range(n_images) for q in range(2)]
    for i in range(n_images):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / f"{i:03d}.png").write_bytes(img.read_bytes())
    path = write_csv(tmp_path / "qa.csv", ["image", "text", "label"], recs)
    rows = load_rows(path)
    assert rows == load_rows(path)
    split_of: dict[Path, set[str]] = defaultdict(set)
    for r in rows:
        split_of[r.image].add(r.split)
    assert all(len(s) == 1 for s in split_of.values()), "an image's rows were put in different splits"
    counts = Counter(next(iter(s)) for s in split_of.values())
    assert set(counts) == set(SPLITS)
    assert 0.7 * n_images <= counts["train"] <= 0.9 * n_images
    assert 0.04 * n_images <= counts["val"] <= 0.16 * n_images
    # A caption manifest naming the same images agrees on every split (no leak between the heads).
    caps = write_csv(tmp_path / "caps.csv", ["image", "text"],
                     [[f"./images/{i:03d}.png", "c"] for i in range(n_images)])
    assert {r.image: r.split for r in load_rows(caps, require_label=False)} == {
        p: next(iter(s)) for p, s in split_of.items()
    }
    other_seed = load_rows(path, seed=1)
    assert [r.split for r in other_seed] != [r.split for r in rows]


def test_auto_split_is_a_pure_function_of_seed_and_key() -> None:
    assert auto_split("images/a.jpg", 0) == auto_split("images/a.jpg", 0)
    shares = Counter(auto_split(f"k{i}", 3) for i in range(5000))
    assert abs(shares["train"] / 5000 - 0.8) < 0.03
    assert abs(shares["val"] / 5000 - 0.1) < 0.02


# ---------------------------------------------------------------- Flickr8k


def test_flickr8k_pairs_cover_every_caption_of_split_images(tmp_path: Path) -> None:
    names = build_flickr8k(tmp_path)
    ds = load_flickr8k(tmp_path)
    assert len(ds.pairs) == sum(FLICKR_SPLITS.values()) * CAPTIONS_PER_IMAGE
    assert all(r.label is None for r in ds.pairs)
    by_split = {s: {r.image.name for r in ds.pairs if r.split == s} for s in SPLITS}
    assert by_split == {s: set(names[s]) for s in SPLITS}  # dev file -> "val"
    assert all(r.image.is_file() and r.image.parent.name == "Flicker8k_Dataset" for r in ds.pairs)
    first = ds.pairs[0]
    assert first.text == "A dog number 0 seen 0 times ." and first.image.name == names["train"][0]
    s = ds.summary
    assert s.images == FLICKR_SPLITS
    assert s.captions == {k: v * CAPTIONS_PER_IMAGE for k, v in FLICKR_SPLITS.items()}
    assert (s.captions_outside_splits, s.images_outside_splits) == (CAPTIONS_PER_IMAGE, 1)
    assert "ignored 5 captions of 1 images that are in no split file" in s.describe()


def test_flickr8k_matching_negatives_come_from_the_same_split_and_never_the_own_image(tmp_path: Path) -> None:
    build_flickr8k(tmp_path)
    pairs = load_flickr8k(tmp_path).pairs
    rows = matching_rows(pairs, seed=0)
    assert len(rows) == 2 * len(pairs)
    split_of = {r.image: r.split for r in pairs}
    negatives_used: set[Path] = set()
    for pair, pos, neg in zip(pairs, rows[0::2], rows[1::2], strict=True):
        assert pos == Row(pair.image, pair.text, MATCH, pair.split)
        assert neg.label == MISMATCH and neg.text == pair.text and neg.split == pair.split
        assert neg.image != pair.image
        assert split_of[neg.image] == pair.split
        negatives_used.add(neg.image)
    assert len(negatives_used) > FLICKR_SPLITS["train"]  # negatives are spread, not one fixed image
    assert Counter(r.label for r in rows) == {MATCH: len(pairs), MISMATCH: len(pairs)}


def test_flickr8k_matching_is_deterministic_for_a_seed_and_varies_across_seeds(tmp_path: Path) -> None:
    build_flickr8k(tmp_path)
    pairs = load_flickr8k(tmp_path).pairs
    assert matching_rows(pairs, seed=5) == matching_rows(list(pairs), seed=5)
    assert matching_rows(pairs, seed=5) != matching_rows(pairs, seed=6)


def test_flickr8k_split_with_a_single_image_cannot_make_negatives(tmp_path: Path) -> None:
    build_flickr8k(tmp_path, splits={"train": 3, "val": 2, "test": 1})
    with pytest.raises(DatasetError, match=r"test \(1 image\)"):
        load_flickr8k(tmp_path).matching_rows()


def test_flickr8k_missing_files_are_named(tmp_path: Path) -> None:
    build_flickr8k(tmp_path)
    (tmp_path / "Flickr_8k.devImages.txt").unlink()
    (tmp_path / TOKEN_FILE).unlink()
    with pytest.raises(DatasetError) as err:
        load_flickr8k(tmp_path)
    msg = str(err.value)
    assert "missing 2 of the expected files: Flickr8k.token.txt, Flickr_8k.devImages.txt" in msg
    assert "Flicker8k_Dataset/" in msg  # the expected layout is spelled out


def test_flickr8k_files_one_folder_down_are_pointed_at(tmp_path: Path) -> None:
    import shutil

    build_flickr8k(tmp_path)
    (tmp_path / "Flickr8k_text").mkdir()
    for name in (TOKEN_FILE, "Flickr_8k.devImages.txt"):  # as the official text zip unpacks
        shutil.move(str(tmp_path / name), str(tmp_path / "Flickr8k_text" / name))
    with pytest.raises(DatasetError) as err:
        load_flickr8k(tmp_path)
    msg = str(err.value)
    assert f"found: {TOKEN_FILE} is at Flickr8k_text/{TOKEN_FILE}" in msg
    assert "Flickr_8k.devImages.txt is at Flickr8k_text/Flickr_8k.devImages.txt" in msg


def test_flickr8k_malformed_token_lines_and_absent_images_are_reported_together(tmp_path: Path) -> None:
    names = build_flickr8k(tmp_path, extra_token_lines=[
        "no_tab_here.jpg#0 A caption separated by a space .",
        "no_index.jpg\tA caption without the #n .",
        f"{flickr_name(0)}#5\t   ",
    ])
    n_lines = (sum(FLICKR_SPLITS.values()) + 1) * CAPTIONS_PER_IMAGE
    gone = [names["val"][1], names["test"][0]]
    for name in gone:
        (tmp_path / "Flicker8k_Dataset" / name).unlink()
    with pytest.raises(DatasetError) as err:
        load_flickr8k(tmp_path)
    msg = str(err.value)
    assert "malformed lines in Flickr8k.token.txt (3 lines):" in msg
    assert f"line {n_lines + 1}: no tab" in msg
    assert f"line {n_lines + 2}: 'no_index.jpg' is not '<image>#<n>'" in msg
    assert f"line {n_lines + 3}: empty caption" in msg
    assert "images listed in a split file but missing from Flicker8k_Dataset/ (2 images):" in msg
    assert f"Flickr_8k.devImages.txt line 2: {gone[0]}" in msg
    assert f"Flickr_8k.testImages.txt line 1: {gone[1]}" in msg


def test_flickr8k_corrupt_image_and_image_in_two_splits_are_errors(tmp_path: Path) -> None:
    names = build_flickr8k(tmp_path)
    (tmp_path / "Flicker8k_Dataset" / names["train"][2]).write_bytes(b"GIF89a but not really")
    with (tmp_path / "Flickr_8k.testImages.txt").open("a", encoding="utf-8") as fh:
        fh.write(names["train"][0] + "\n")
    with pytest.raises(DatasetError) as err:
        load_flickr8k(tmp_path)
    msg = str(err.value)
    assert f"unreadable images (1 image):\n    {names['train'][2]} (Flickr_8k.trainImages.txt line 3)" in msg
    assert f"images listed in more than one split file (1 image):\n    {names['train'][0]}: train, test" in msg


def test_flickr8k_accepts_the_corrected_folder_spelling(tmp_path: Path) -> None:
    build_flickr8k(tmp_path)
    (tmp_path / "Flicker8k_Dataset").rename(tmp_path / "Flickr8k_Dataset")
    assert load_flickr8k(tmp_path).image_dir.name == "Flickr8k_Dataset"


def test_flickr8k_layout_detection(tmp_path: Path) -> None:
    assert not is_flickr8k_root(tmp_path)
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("", encoding="utf-8")
    assert is_flickr8k_root(tmp_path)  # partial: routed to the loader, which names what is missing


# ---------------------------------------------------------------- prepare_data dispatch


def _cfg(data: Path | str, **kw: object) -> TrainConfig:
    return TrainConfig(data=str(data), **kw)  # type: ignore[arg-type]


def test_prepare_data_reads_a_flickr8k_folder_as_matching_plus_captions(tmp_path: Path) -> None:
    build_flickr8k(tmp_path)
    data = prepare_data(_cfg(tmp_path), progress=False)
    assert data.labels == MATCH_LABELS
    assert len(data.captions) == sum(FLICKR_SPLITS.values()) * CAPTIONS_PER_IMAGE
    assert len(data.rows) == 2 * len(data.captions)
    assert len(data.image_paths) == sum(FLICKR_SPLITS.values())
    assert {r.split for r in data.split("val")} == {"val"} and data.caption_split("test")
    assert "Flickr8k: train 8 images / 40 captions" in data.summary
    assert prepare_data(_cfg(tmp_path), progress=False).rows == data.rows
    with pytest.raises(DatasetError, match="brings its own captions"):
        prepare_data(_cfg(tmp_path, captions=str(tmp_path / "caps.csv")), progress=False)


def test_prepare_data_rejects_a_folder_without_the_flickr8k_layout(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg", 0)
    with pytest.raises(DatasetError) as err:
        prepare_data(_cfg(tmp_path), progress=False)
    msg = str(err.value)
    assert "without the Flickr8k layout" in msg
    assert "Flickr8k.token.txt" in msg and "Flicker8k_Dataset/" in msg and "CSV/JSONL manifest" in msg


def test_prepare_data_rejects_a_nonexistent_data_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        prepare_data(_cfg(tmp_path / "nope.csv"), progress=False)


def test_prepare_data_reads_a_manifest_with_optional_captions(images: Path) -> None:
    qa = write_csv(images / "qa.csv", ["image", "text", "label", "split"], [
        ["images/0.jpg", "q", "cat", "train"], ["images/1.jpg", "q", "dog", "train"],
        ["images/2.jpg", "q", "dog", "val"],
    ])
    caps = write_jsonl(images / "caps.jsonl", [
        {"image": "images/0.jpg", "text": "a cat", "split": "train"},
        {"image": "images/3.jpg", "text": "another", "split": "test"},
    ])
    data = prepare_data(_cfg(qa, captions=str(caps)), progress=False)
    assert data.labels == ["cat", "dog"]
    assert [r.text for r in data.captions] == ["a cat", "another"]
    assert len(data.image_paths) == 4
    assert prepare_data(_cfg(qa), progress=False).captions == []


def test_prepare_data_rejects_captions_whose_splits_disagree_with_the_rows(images: Path) -> None:
    qa = write_csv(images / "qa.csv", ["image", "text", "label", "split"], [
        ["images/0.jpg", "q", "cat", "train"], ["images/1.jpg", "q", "dog", "val"],
    ])
    caps = write_csv(images / "caps.csv", ["image", "text", "split"], [["images/1.jpg", "a dog", "train"]])
    with pytest.raises(DatasetError, match=r"(?s)1 image is in different splits.*1\.jpg: val in the rows, train"):
        prepare_data(_cfg(qa, captions=str(caps)), progress=False)


def test_training_one_epoch_on_a_flickr8k_folder(tmp_path: Path, tiny_config: TrainConfig) -> None:
    root = tmp_path / "flickr8k"
    build_flickr8k(root)
    cfg = dataclasses.replace(tiny_config, data=str(root), run_dir=str(tmp_path / "run"), epochs=1, batch_size=16)
    from model.train import train

    run_dir = train(cfg, progress=False)
    assert (run_dir / "labels.txt").read_text(encoding="utf-8").splitlines() == MATCH_LABELS
    results = [json.loads(x) for x in (run_dir / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(results) == 1
    assert 0.0 <= results[0]["val_accuracy"] <= 1.0
    assert 0.0 <= results[0]["val_text_to_image_R@1"] <= 1.0  # the contrastive head saw the captions
    assert (run_dir / "best.pt").is_file()
