"""``mmfusion index import | stats | rebuild``: bulk import with per-row failures, JSON stats, and
re-embedding under a new bundle (the old index refuses to load until it is rebuilt)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.bundle.verify import load_bundle_manifest
from app.cli import main as mmfusion
from app.index import VectorIndex
from app.main import create_app


@contextmanager
def app_client(settings, **update: object) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update=update))) as c:
        yield c


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = mmfusion(["index", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code, out, _ = run(capsys, *argv, "--json") if argv[0] != "stats" else run(capsys, *argv)
    return code, json.loads(out)


@pytest.fixture(scope="module")
def bundle_v2(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle re-versioned: same hashed files, so the manifest still validates."""
    out = tmp_path_factory.mktemp("bundle-v2") / "tiny"
    shutil.copytree(tiny_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = "0.0.2"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert load_bundle_manifest(out).version == "0.0.2"
    return out


@pytest.fixture
def manifest_csv(tmp_path: Path, tiny_config) -> Path:
    """Six good rows (image, image+text, text, relative path, metadata, a quoted newline) and two bad ones."""
    images = sorted((Path(tiny_config.demo_dir) / "images").glob("*.png"))
    local = tmp_path / "pics"
    local.mkdir()
    shutil.copy(images[3], local / "three.png")
    path = tmp_path / "items.csv"
    path.write_text(
        "id,image,text,metadata\n"
        f'img-0,{images[0]},,"{{""split"": ""val"", ""n"": 0}}"\n'
        f"pair-1,{images[1]},a small green triangle at the top,\n"
        'text-2,,a large red circle,"{""n"": 2}"\n'
        "bad id,{images[2]},,\n"
        "rel-3,pics/three.png,,\n"
        f"missing-5,{tmp_path / 'nope.png'},,\n"
        'text-6,,"a blue square, on the left",\n'
        'multi-7,,"two lines:\na red circle",\n'
    )
    return path


def index_args(settings, bundle: Path | None = None) -> list[str]:
    return ["--bundle", str(bundle or settings.bundle), "--index-path", str(settings.index_path)]


def test_import_adds_the_good_rows_and_reports_each_bad_one(settings, manifest_csv: Path, capsys) -> None:
    code, report = run_json(capsys, "import", str(manifest_csv), *index_args(settings), "--batch-size", "2")
    assert code == 1
    assert (report["rows"], report["added"], report["replaced"], report["failed"], report["count"]) == (8, 6, 0, 2, 6)
    assert [(f["line"], f["id"]) for f in report["failures"]] == [(5, "bad id"), (7, "missing-5")]
    assert "characters outside" in report["failures"][0]["reason"]
    assert "cannot read image file" in report["failures"][1]["reason"]

    with app_client(settings) as c:
        img = c.get("/v1/index/items/img-0").json()
        assert img["metadata"] == {"split": "val", "n": 0}
        assert img["source"]["embedded_from"] == "image"
        assert Path(img["source"]["image_path"]).is_absolute()
        rel = c.get("/v1/index/items/rel-3").json()
        assert rel["source"]["image_path"] == str((manifest_csv.parent / "pics" / "three.png").resolve())
        assert c.get("/v1/index/items/text-6").json()["text"] == "a blue square, on the left"
        assert c.get("/v1/index/items/multi-7").json()["text"].endswith("a red circle")
        # Stored exactly as the API stores it: same encoders, same combination rule.
        pair = np.asarray(c.get("/v1/index/items/pair-1", params={"include_vector": True}).json()["vector"])
        image_path = Path(c.get("/v1/index/items/pair-1").json()["source"]["image_path"])
        ref = c.post("/v1/embed", files={"image": ("x.png", image_path.read_bytes(), "image/png")},
                     data={"text": "a small green triangle at the top"}).json()
        mean = np.asarray(ref["image_embedding"]) + np.asarray(ref["text_embedding"])
        np.testing.assert_allclose(pair, mean / np.linalg.norm(mean), atol=1e-5)

    again, report = run_json(capsys, "import", str(manifest_csv), *index_args(settings))
    assert again == 1
    assert (report["added"], report["replaced"], report["count"]) == (0, 6, 6)


def test_import_jsonl_reports_line_numbers_of_unparseable_rows(settings, tmp_path: Path, capsys) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a", "text": "a red circle", "metadata": {"tags": ["x"]}}),
        "",
        "{not json",
        json.dumps({"id": "b", "text": "a blue square", "colour": "blue"}),
        json.dumps({"id": "c", "text": "a green circle", "metadata": {"_source": "mine"}}),
        json.dumps({"id": "a", "text": "again"}),
        json.dumps({"id": "d", "text": "   "}),
        json.dumps({"id": "e", "text": "a yellow triangle", "metadata": '{"n": 1}'}),
    ]) + "\n")
    code, out, _ = run(capsys, "import", str(path), *index_args(settings), "--no-progress")
    assert code == 1
    assert "imported 2 of 7 rows" in out
    assert "line 3 (id None): not valid JSON" in out
    assert "line 4 (id 'b'): unknown key(s) ['colour']" in out
    assert "line 5 (id 'c'): metadata key '_source' is reserved" in out
    assert "line 6 (id 'a'): id 'a' is repeated in the manifest (first on line 1)" in out
    assert "line 7 (id 'd'): text must not be empty" in out
    with VectorIndex.open(settings.index_path, bundle_name="tiny-test", bundle_version="0.0.1",
                          dim=load_bundle_manifest(settings.bundle).embedding_dim) as index:
        assert sorted(index.ids()) == ["a", "e"]
        assert index.get("e").metadata["n"] == 1


def test_stats_prints_json_with_identity_compatibility_and_sources(settings, manifest_csv: Path, bundle_v2,
                                                                   capsys) -> None:
    run(capsys, "import", str(manifest_csv), *index_args(settings))
    code, stats = run_json(capsys, "stats", *index_args(settings))
    assert code == 0
    assert stats["count"] == 6
    assert stats["dim"] == load_bundle_manifest(settings.bundle).embedding_dim
    assert stats["backend"] == "faiss-flat-ip"
    fingerprint = load_bundle_manifest(settings.bundle).embedding_fingerprint()
    assert stats["index_bundle"] == {"name": "tiny-test", "version": "0.0.1", "dim": stats["dim"],
                                     "embedding_fingerprint": fingerprint}
    assert stats["compatible"] is True
    assert stats["sources"] == {"image": 2, "image+text": 1, "text": 3}
    assert stats["rebuildable"] == 6
    assert stats["last_persisted"]
    code, other = run_json(capsys, "stats", *index_args(settings, bundle_v2))
    assert code == 0
    assert other["compatible"] is False
    assert "mmfusion index rebuild" in other["problem"]


def test_stats_calls_an_index_of_other_weights_under_the_same_name_incompatible(settings, capsys) -> None:
    # As the server decides: name, version and dimension match, the embedding fingerprint does not.
    manifest = load_bundle_manifest(settings.bundle)
    with VectorIndex.open(settings.index_path, bundle_name=manifest.name, bundle_version=manifest.version,
                          dim=manifest.embedding_dim, embedding_fingerprint="0123456789abcdef") as index:
        index.add("a", np.ones(manifest.embedding_dim))
    code, stats = run_json(capsys, "stats", *index_args(settings))
    assert code == 0
    assert stats["compatible"] is False and "mmfusion index rebuild" in stats["problem"]
    assert stats["loaded_bundle"]["embedding_fingerprint"] == manifest.embedding_fingerprint()


def test_stats_of_a_missing_index_exits_1(settings, capsys) -> None:
    code, stats = run_json(capsys, "stats", *index_args(settings))
    assert code == 1
    assert stats["exists"] is False


def test_rebuild_under_a_new_bundle_makes_the_refused_index_load_again(settings, manifest_csv: Path, bundle_v2,
                                                                       capsys) -> None:
    run(capsys, "import", str(manifest_csv), *index_args(settings))
    with app_client(settings) as c:
        assert c.post("/v1/index/items", json={"id": "api-1", "text": "added over http",
                                               "metadata": {"via": "api"}}).status_code == 201
    dim = load_bundle_manifest(settings.bundle).embedding_dim
    with VectorIndex.open(settings.index_path, bundle_name="tiny-test", bundle_version="0.0.1", dim=dim) as index:
        before = {i: index.get(i) for i in index.ids()}
    assert len(before) == 7

    with app_client(settings, bundle=bundle_v2) as c:
        status = c.get("/v1/index").json()
        assert status["available"] is False
        assert "mmfusion index rebuild" in status["message"]
        refused = c.post("/v1/search", json={"text": "a red circle"})
        assert refused.status_code == 503
        assert "mmfusion index rebuild" in refused.json()["error"]["message"]

    code, report = run_json(capsys, "rebuild", *index_args(settings, bundle_v2), "--no-progress")
    assert code == 0, report
    assert (report["items"], report["rebuilt"], report["unrebuildable"]) == (7, 7, 0)
    assert report["swapped"] is True and report["atomic_swap"] is True
    assert report["to_bundle"]["version"] == "0.0.2"
    assert not list(settings.index_path.parent.glob(".index.rebuild*"))

    with app_client(settings, bundle=bundle_v2) as c:
        status = c.get("/v1/index").json()
        assert status["available"] is True
        assert status["count"] == 7
        assert status["index_bundle"]["version"] == "0.0.2"
        for item_id, old in before.items():
            got = c.get(f"/v1/index/items/{item_id}", params={"include_vector": True}).json()
            assert got["text"] == old.text
            assert got["metadata"] == {k: v for k, v in old.metadata.items() if k != "_source"}
            assert got["source"] == old.metadata["_source"]
            # Same weights under a new version: re-embedding from the recorded source reproduces the vector.
            np.testing.assert_allclose(got["vector"], old.vector, atol=1e-5)
        assert c.post("/v1/search", json={"text": "a red circle"}).status_code == 200
    with app_client(settings) as c:  # and now the old bundle is the one refused
        assert c.get("/v1/index").json()["available"] is False


def test_rebuild_changes_nothing_while_items_cannot_be_re_embedded(settings, bundle_v2, tiny_config,
                                                                  capsys) -> None:
    png = sorted((Path(tiny_config.demo_dir) / "images").glob("*.png"))[0].read_bytes()
    with app_client(settings) as c:
        assert c.post("/v1/index/items", files={"image": ("a.png", png, "image/png")},
                      data={"id": "uploaded"}).status_code == 201
        assert c.post("/v1/index/items", json={"id": "texty", "text": "a red circle"}).status_code == 201
    dim = load_bundle_manifest(settings.bundle).embedding_dim
    with VectorIndex.open(settings.index_path, bundle_name="tiny-test", bundle_version="0.0.1", dim=dim) as index:
        index.add("seeded", np.ones(dim), text="from a seed index", metadata={"source": "demo"})

    code, report = run_json(capsys, "rebuild", *index_args(settings, bundle_v2), "--dry-run")
    assert code == 1
    assert report["swapped"] is False
    code, out, _ = run(capsys, "rebuild", *index_args(settings, bundle_v2), "--no-progress")
    assert code == 1
    assert "nothing changed: 2 of 3 items cannot be re-embedded" in out
    assert "uploaded: embedded from an uploaded image, which is not kept" in out
    assert "seeded: no recorded source" in out
    with app_client(settings) as c:  # untouched: still the old bundle's index
        assert c.get("/v1/index").json()["count"] == 3

    code, report = run_json(capsys, "rebuild", *index_args(settings, bundle_v2), "--drop-unrebuildable",
                            "--no-progress")
    assert code == 1
    assert report["swapped"] is True
    assert sorted(p["id"] for p in report["problems"]) == ["seeded", "uploaded"]
    with app_client(settings, bundle=bundle_v2) as c:
        assert c.get("/v1/index").json()["count"] == 1
        assert c.get("/v1/index/items/texty").status_code == 200


def test_import_into_an_index_the_server_holds_is_refused(settings, manifest_csv: Path, capsys) -> None:
    with app_client(settings):
        code, _, err = run(capsys, "import", str(manifest_csv), *index_args(settings))
    assert code == 2
    assert "already open" in err and "stop it first" in err


def test_import_of_an_index_built_by_another_bundle_is_refused(settings, manifest_csv: Path, bundle_v2,
                                                               capsys) -> None:
    run(capsys, "import", str(manifest_csv), *index_args(settings))
    code, _, err = run(capsys, "import", str(manifest_csv), *index_args(settings, bundle_v2))
    assert code == 2
    assert "mmfusion index rebuild" in err


def test_a_csv_with_unknown_columns_is_refused_before_anything_is_written(settings, tmp_path: Path, capsys) -> None:
    path = tmp_path / "items.csv"
    path.write_text("id,txt\na,hello\n")
    code, _, err = run(capsys, "import", str(path), *index_args(settings))
    assert code == 2
    assert "'txt'" in err
    assert not settings.index_path.exists()


@pytest.mark.parametrize(("command", "words"), [
    ("import", ["MANIFEST", "CSV", "JSONL", "--batch-size", "re-normalised"]),
    ("stats", ["JSON", "compatible"]),
    ("rebuild", ["--drop-unrebuildable", "--keep-old", "atomically"]),
])
def test_every_subcommand_explains_itself(command: str, words: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        mmfusion(["index", command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in ["--bundle", "--index-path", "MMFUSION_", *words]:
        assert word in text, word


def test_import_and_rebuild_never_import_torch(settings, manifest_csv: Path, bundle_v2) -> None:
    """The index commands belong to the serving install, which has no torch."""
    code = (
        "import sys\n"
        "from app.cli import main\n"
        f"rc = main(['index', 'import', {str(manifest_csv)!r}, '--bundle', {str(settings.bundle)!r}, "
        f"'--index-path', {str(settings.index_path)!r}, '--no-progress'])\n"
        f"rc2 = main(['index', 'rebuild', '--bundle', {str(bundle_v2)!r}, "
        f"'--index-path', {str(settings.index_path)!r}, '--no-progress'])\n"
        "print('RESULT', rc, rc2, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "RESULT 1 0 False" in out.stdout, out.stdout + out.stderr
