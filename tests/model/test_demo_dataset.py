"""The built-in demo dataset: deterministic, well-formed, unambiguous, and needing both modalities."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from model.data import demo
from model.data.demo import (
    BACKGROUNDS,
    CELLS,
    COLORS,
    SHAPES,
    DemoConfig,
    SceneSpec,
    answer_vocabulary,
    caption_for,
    cell_bounds,
    generate_demo_dataset,
    questions_for,
    render_scene,
    sample_scene,
)
from model.data.rows import load_rows

SMALL = DemoConfig(n_images=40, image_size=64, questions_per_image=4, seed=3)


def _scenes(n: int, seed: int = 0, image_size: int = 224) -> list[SceneSpec]:
    rng = random.Random(seed)
    return [sample_scene(rng, image_size) for _ in range(n)]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _expected_answer(scene: SceneSpec, question: str) -> str:
    """Re-derive a question's answer from the scene spec, independently of the generator."""
    by_kind = {s.kind: s for s in scene.shapes}
    by_color = {s.color: s for s in scene.shapes}
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        return by_kind[m[1]].color
    if m := re.fullmatch(r"what shape is (\w+)\?", question):
        return by_color[m[1]].kind
    if question == "how many shapes are there?":
        return str(len(scene.shapes))
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if (m[1], m[2]) in {(s.color, s.kind) for s in scene.shapes} else "no"
    if m := re.fullmatch(r"is the (\w+) large or small\?", question):
        return by_kind[m[1]].size
    raise AssertionError(f"unexpected question template: {question!r}")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(root, SMALL, progress=False)
    return root


def test_same_seed_gives_byte_identical_files(small_dataset: Path, tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path, SMALL, progress=False)
    assert _tree_digest(tmp_path) == _tree_digest(small_dataset)


def test_different_seed_gives_different_images(small_dataset: Path, tmp_path: Path) -> None:
    other = DemoConfig(n_images=SMALL.n_images, image_size=SMALL.image_size, seed=SMALL.seed + 1)
    generate_demo_dataset(tmp_path, other, progress=False)
    a = {k: v for k, v in _tree_digest(small_dataset).items() if k.startswith("images")}
    b = {k: v for k, v in _tree_digest(tmp_path).items() if k.startswith("images")}
    assert a.keys() == b.keys()
    assert not set(a.values()) & set(b.values())


def test_writes_all_files_with_expected_shapes(small_dataset: Path) -> None:
    qa = _read_jsonl(small_dataset / "qa.jsonl")
    captions = _read_jsonl(small_dataset / "captions.jsonl")
    meta = json.loads((small_dataset / "demo.json").read_text(encoding="utf-8"))
    assert len(qa) == SMALL.n_images * SMALL.questions_per_image
    assert len(captions) == SMALL.n_images
    assert meta["config"] == SMALL.to_dict()
    assert meta["counts"]["questions"] == len(qa)
    images = sorted((small_dataset / "images").iterdir())
    assert [p.name for p in images] == [f"{i:05d}.png" for i in range(SMALL.n_images)]
    assert {r["image"] for r in qa} == {r["image"] for r in captions} == {f"images/{p.name}" for p in images}


def test_generated_manifests_load_with_the_training_row_loader(small_dataset: Path) -> None:
    labels = (small_dataset / "labels.txt").read_text(encoding="utf-8").splitlines()
    rows = load_rows(small_dataset / "qa.jsonl", labels=labels)
    caps = load_rows(small_dataset / "captions.jsonl", require_label=False)
    assert len(rows) == SMALL.n_images * SMALL.questions_per_image
    assert len(caps) == SMALL.n_images
    assert all(r.image.is_file() for r in rows)


def test_second_call_with_same_config_does_not_rerender(
    small_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_: object, **__: object) -> None:
        raise AssertionError("render_scene called for an up-to-date dataset")

    monkeypatch.setattr(demo, "render_scene", fail)
    paths = generate_demo_dataset(small_dataset, SMALL, progress=False)
    assert paths.root == small_dataset
    assert paths.qa == small_dataset / "qa.jsonl"


def test_changed_config_regenerates_and_drops_stale_images(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path, DemoConfig(n_images=6, image_size=64), progress=False)
    generate_demo_dataset(tmp_path, DemoConfig(n_images=4, image_size=64), progress=False)
    assert len(list((tmp_path / "images").iterdir())) == 4
    assert len(_read_jsonl(tmp_path / "captions.jsonl")) == 4


def test_every_answer_is_in_the_fixed_vocabulary_and_labels_txt_matches(small_dataset: Path) -> None:
    vocab = answer_vocabulary()
    assert vocab == sorted(vocab)
    assert set(vocab) == {*COLORS, *SHAPES, "1", "2", "3", "yes", "no", "large", "small"}
    assert (small_dataset / "labels.txt").read_text(encoding="utf-8").splitlines() == vocab
    assert {r["label"] for r in _read_jsonl(small_dataset / "qa.jsonl")} <= set(vocab)


def test_splits_are_disjoint_by_image_and_match_fractions(tmp_path: Path) -> None:
    config = DemoConfig(n_images=100, image_size=32, questions_per_image=2, seed=1)
    generate_demo_dataset(tmp_path, config, progress=False)
    split_of: dict[str, set[str]] = defaultdict(set)
    for rec in _read_jsonl(tmp_path / "qa.jsonl") + _read_jsonl(tmp_path / "captions.jsonl"):
        split_of[rec["image"]].add(rec["split"])
    assert all(len(s) == 1 for s in split_of.values()), "an image's rows span several splits"
    counts = Counter(next(iter(s)) for s in split_of.values())
    assert counts == {"train": 70, "val": 15, "test": 15}


def test_scenes_are_unambiguous_and_shapes_stay_inside_distinct_cells() -> None:
    for scene in _scenes(300):
        kinds = [s.kind for s in scene.shapes]
        colors = [s.color for s in scene.shapes]
        cells = [s.cell for s in scene.shapes]
        assert 1 <= len(scene.shapes) <= 3
        assert len(set(kinds)) == len(kinds) and len(set(colors)) == len(colors)
        assert len(set(cells)) == len(cells)
        assert cells == sorted(cells, key=CELLS.index), "shapes are not in reading order"
        assert scene.background in BACKGROUNDS and scene.background not in COLORS
        for s in scene.shapes:
            left, top, right, bottom = cell_bounds(s.cell, 224)
            x, y = s.center
            assert left <= x - s.radius and x + s.radius <= right
            assert top <= y - s.radius and y + s.radius <= bottom


def test_background_colours_are_far_from_every_shape_colour() -> None:
    for bg in BACKGROUNDS.values():
        for fg in COLORS.values():
            assert np.linalg.norm(np.subtract(bg, fg)) > 90


def test_answers_are_correct_for_the_scene_and_questions_distinct() -> None:
    rng = random.Random(7)
    for scene in _scenes(300, seed=7):
        qs = questions_for(scene, rng, 6)
        assert len(qs) == 6
        assert len({q for q, _ in qs}) == 6
        for question, answer in qs:
            assert answer == _expected_answer(scene, question), (scene, question)


def test_questions_cover_the_types_evenly() -> None:
    rng = random.Random(8)
    kinds: Counter[str] = Counter()
    for scene in _scenes(500, seed=8):
        for question, _ in questions_for(scene, rng, 4):
            kinds[question.split()[0] + " " + question.split()[1]] += 1
    assert len(kinds) == 5
    assert max(kinds.values()) - min(kinds.values()) < 0.15 * (2000 / 5)


def test_yes_no_answers_are_balanced() -> None:
    rng = random.Random(9)
    answers = [
        a
        for scene in _scenes(600, seed=9)
        for q, a in questions_for(scene, rng, 5)
        if q.startswith("is there")
    ]
    assert len(answers) >= 300
    assert 0.45 <= answers.count("yes") / len(answers) <= 0.55


def test_question_text_alone_barely_predicts_the_answer() -> None:
    """A text-only model can do no better than the per-question majority answer; keep that near chance."""
    rng = random.Random(10)
    by_question: dict[str, Counter[str]] = defaultdict(Counter)
    for scene in _scenes(3000, seed=10):
        for question, answer in questions_for(scene, rng, 5):
            by_question[question][answer] += 1
    color_of_circle = by_question["what color is the circle?"]
    assert set(color_of_circle) == set(COLORS)
    assert max(color_of_circle.values()) / sum(color_of_circle.values()) < 0.25  # uniform = 1/6
    for question, answers in by_question.items():
        if question.startswith("is there"):
            assert 0.3 <= answers["yes"] / sum(answers.values()) <= 0.7, question
    total = sum(sum(c.values()) for c in by_question.values())
    majority = sum(max(c.values()) for c in by_question.values()) / total
    # Chance per type: color 1/6, shape 1/3, count 1/3, exists 1/2, size 1/2 -> mean ~0.37.
    assert majority < 0.42


def test_rendered_image_has_right_size_mode_and_shape_colours() -> None:
    for scene in _scenes(20, seed=11):
        img = render_scene(scene, 224)
        assert img.size == (224, 224) and img.mode == "RGB"
        pixels = np.asarray(img, dtype=np.int32)
        for s in scene.shapes:
            x, y = s.center
            assert np.abs(pixels[y, x] - np.asarray(COLORS[s.color])).max() <= 15, s


def test_rendering_is_deterministic_given_the_scene() -> None:
    scene = _scenes(1, seed=12)[0]
    assert render_scene(scene, 224).tobytes() == render_scene(scene, 224).tobytes()


def test_sample_scene_accepts_a_numpy_generator() -> None:
    a = sample_scene(np.random.default_rng(5), 224)
    b = sample_scene(np.random.default_rng(5), 224)
    assert a == b


def test_captions_are_almost_all_distinct() -> None:
    captions = [caption_for(s) for s in _scenes(200, seed=13)]
    assert len(set(captions)) >= 0.98 * len(captions)


def test_caption_names_every_shape_in_reading_order() -> None:
    scene = next(s for s in _scenes(50, seed=14) if len(s.shapes) == 3)
    caption = caption_for(scene)
    positions = [caption.index(f"{s.size} {s.color} {s.kind}") for s in scene.shapes]
    assert positions == sorted(positions)
    assert caption.endswith(f"on a {scene.background} background")


@pytest.mark.parametrize(
    "kwargs",
    [{"n_images": 0}, {"questions_per_image": 0}, {"split_fractions": (0.5, 0.5, 0.5)}, {"image_size": 8}],
)
def test_invalid_config_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DemoConfig(**kwargs)  # type: ignore[arg-type]
