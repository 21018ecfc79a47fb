"""The training-side CLI: every option documented, evaluate prints real metrics, train writes plots."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from model.cli import build_parser, main
from model.config import TrainConfig


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_train_help_lists_every_config_field(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in out, f.name
    assert "--no-plots" in out and "--resume" in out


def test_every_option_of_every_command_has_help_text() -> None:
    subs = _subparsers(build_parser())
    assert {"train", "export", "verify", "evaluate", "ablate", "build-default"} <= set(subs)
    for name, sub in subs.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip() and not action.help.startswith(" ("), (name, action.dest)


def test_export_and_verify_expose_int8_and_run_options() -> None:
    subs = _subparsers(build_parser())
    export = subs["export"].parse_args(["RUN", "--out", "B", "--int8"])
    assert export.int8 is True and export.calibration_samples == 128
    from model.quantize import Int8Options

    assert export.agreement_margin == Int8Options().agreement_margin  # the CLI default is the library's
    assert subs["export"].parse_args(["RUN", "--out", "B", "--agreement-margin", "0"]).agreement_margin == 0.0
    verify = subs["verify"].parse_args(["B", "--run", "RUN"])
    assert verify.run == "RUN" and verify.min_int8_agreement == 0.99


def test_evaluate_run_prints_the_checkpoint_metrics(tiny_run: Path, capsys) -> None:
    from model.train import evaluate_run

    assert main(["evaluate", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    expected = evaluate_run(tiny_run, "test")
    assert "accuracy" in out and "macro-F1" in out
    assert "text -> image" in out and "image -> text" in out and "median rank" in out
    assert f"{expected['test_accuracy']:.4f}" in out
    assert f"{expected['test_macro_f1']:.4f}" in out
    assert f"{expected['test_text_to_image_R@1']:.4f}" in out

    assert main(["evaluate", str(tiny_run), "--split", "val", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["kind"] == "run" and body["split"] == "val"
    val = evaluate_run(tiny_run, "val")
    assert body["metrics"]["accuracy"] == pytest.approx(val["val_accuracy"])
    for key in ("R@1", "R@5", "R@10"):
        assert f"image_to_text_{key}" in body["metrics"] and f"text_to_image_{key}" in body["metrics"]


def test_evaluate_bundle_through_onnx_runtime_matches_pytorch(tiny_run: Path, tiny_bundle: Path, tiny_config,
                                                               capsys) -> None:
    from model.train import evaluate_run

    demo = Path(tiny_config.demo_dir)
    argv = ["evaluate", str(tiny_bundle), "--json", "--data", str(demo / "qa.jsonl"),
            "--captions", str(demo / "captions.jsonl")]
    assert main(argv) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["kind"] == "bundle" and body["precision"] == "fp32"
    torch_metrics = evaluate_run(tiny_run, "test")
    for key, value in body["metrics"].items():
        assert value == pytest.approx(torch_metrics[f"test_{key}"], abs=1e-6), key


def test_evaluate_refuses_a_folder_that_is_neither_run_nor_bundle(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "neither a training run" in capsys.readouterr().err


def test_train_writes_learning_curves_and_confusion_matrix(tiny_config, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = ["train", "--quiet", "--run-dir", str(run_dir), "--epochs", "1",
            "--encoder-kwargs", json.dumps(tiny_config.encoder_kwargs)]
    for name in ("data", "demo_dir", "demo_images", "demo_image_size", "image_size", "batch_size", "hidden_dim",
                 "embed_dim", "num_threads"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(tiny_config, name))]
    assert main(argv) == 0
    for name in ("training_curves.png", "confusion_matrix_val.png"):
        path = run_dir / name
        assert path.is_file(), name
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
    # the curves come from results.jsonl: one point per epoch that ran
    assert len((run_dir / "results.jsonl").read_text().splitlines()) == 1


def test_ablate_trains_every_requested_strategy_and_baselines_into_one_table(tiny_config, tmp_path: Path,
                                                                             capsys) -> None:
    out_dir = tmp_path / "results"
    argv = ["ablate", "--fusions", "concat,image_only,text_only", "--epochs", "1", "--demo-images", "160",
            "--work-dir", str(tmp_path / "work"), "--out-dir", str(out_dir), "--quiet"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for name in ("concat", "image_only", "text_only"):
        assert name in table
    body = json.loads((out_dir / "ablation.json").read_text())
    assert [r["fusion"] for r in body["rows"]] == ["concat", "image_only", "text_only"]
    for row in body["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["onnx_ms_per_item"] > 0 and row["parameters"] >= row["trainable_parameters"] > 0
        assert row["train_seconds"] > 0
    markdown = (out_dir / "ablation.md").read_text()
    assert markdown.count("\n| ") >= 4 and "ONNX ms/item" in markdown


# --------------------------------------------------------------------------------------------------
# What a user gets wrong: one line and exit 2, never a traceback; runs that work from any folder
# --------------------------------------------------------------------------------------------------


def _tiny_train_argv(tiny_config, run_dir: Path, *extra: str) -> list[str]:
    argv = ["train", "--quiet", "--no-plots", "--run-dir", str(run_dir), "--epochs", "1",
            "--encoder-kwargs", json.dumps(tiny_config.encoder_kwargs)]
    for name in ("data", "demo_dir", "demo_images", "demo_image_size", "image_size", "batch_size", "hidden_dim",
                 "embed_dim", "num_threads", "name", "version"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(tiny_config, name))]
    return [*argv, *extra]


def _small_csv_dataset(root: Path, rows_per_label: int = 12) -> Path:
    """Real little images and a manifest with labels red/blue and explicit splits."""
    (root / "imgs").mkdir(parents=True)
    lines = ["image,text,label,split"]
    for i in range(2 * rows_per_label):
        label = ("red", "blue")[i % 2]
        Image.new("RGB", (48, 48), (220, 30, 30) if label == "red" else (30, 30, 220)).save(root / "imgs" / f"{i}.png")
        split = "val" if i % 6 == 4 else "test" if i % 6 == 5 else "train"
        lines.append(f"imgs/{i}.png,what color is it?,{label},{split}")
    (root / "data.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "data.csv"


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--data", "no/such/data.csv"], "does not exist"),
    (["train", "--epochs", "0"], "epochs must be an integer >= 1"),
    (["train", "--early-stopping-metric", "val_acc"], "is not a validation metric"),
    (["train", "--config", "no/such/config.json"], "No such file"),
    (["export", "no/such/run", "--out", "somewhere"], "not found: is no/such/run a finished training run?"),
])
def test_user_errors_are_one_line_and_exit_2_not_a_traceback(tmp_path: Path, monkeypatch, capsys,
                                                             argv: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--run-dir", "run"] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists() or argv[1] == "--data"  # refused before anything was written


def test_an_unknown_fusion_is_a_usage_error_naming_the_choices(tiny_config, tmp_path: Path, capsys) -> None:
    assert main(_tiny_train_argv(tiny_config, tmp_path / "run", "--fusion", "nope")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown fusion strategy 'nope'; choose one of") and "concat" in err


def test_resume_continues_the_run_from_its_own_config(tiny_config, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert main(_tiny_train_argv(tiny_config, run_dir)) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    # Only the run folder and a longer schedule: every other setting comes from the run's config.json.
    assert main(["train", "--quiet", "--no-plots", "--run-dir", str(run_dir), "--resume", "--epochs", "2"]) == 0
    assert len((run_dir / "results.jsonl").read_text().splitlines()) == 2
    assert json.loads((run_dir / "config.json").read_text()) == {**saved, "epochs": 2}


def test_resume_refuses_flags_that_change_what_is_trained_before_writing_anything(tiny_config, tmp_path: Path,
                                                                                   capsys) -> None:
    run_dir = tmp_path / "run"
    assert main(_tiny_train_argv(tiny_config, run_dir)) == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    argv = ["train", "--quiet", "--run-dir", str(run_dir), "--resume", "--fusion", "cross_attention"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--fusion ('concat' -> 'cross_attention')" in err and "new --run-dir" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    assert main(["train", "--run-dir", str(tmp_path / "never"), "--resume"]) == 2
    assert "is {} a training run".format(tmp_path / "never") in capsys.readouterr().err


def test_a_run_trained_with_relative_paths_exports_from_another_folder(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    _small_csv_dataset(work / "ds")
    monkeypatch.chdir(work)
    argv = ["train", "--quiet", "--no-plots", "--run-dir", "runs/csv", "--data", "ds/data.csv", "--epochs", "1",
            "--image-size", "32", "--batch-size", "8", "--hidden-dim", "16", "--embed-dim", "8", "--num-threads", "1",
            "--encoder-kwargs",
            json.dumps({"image": {"width": 4, "out_dim": 8}, "text": {"embed_dim": 8, "hidden": 8}})]
    assert main(argv) == 0
    config = json.loads((work / "runs/csv/config.json").read_text())
    assert config["data"] == str((work / "ds/data.csv").resolve())
    monkeypatch.chdir(tmp_path)
    assert main(["export", "work/runs/csv", "--out", "bundle", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "bundle/manifest.json").read_text())
    # No caption pairs: the contrastive head never trained, so the bundle does not claim retrieval.
    assert manifest["tasks"] == ["classification"]


def test_a_label_with_a_couple_of_rows_among_common_ones_is_flagged_as_a_likely_typo(caplog) -> None:
    from model.data.rows import Row
    from model.train import warn_about_rare_labels

    rows = [Row(image=Path(f"{i}.png"), text="q", label=("red", "blue")[i % 2], split="train") for i in range(40)]
    rows.append(Row(image=Path("x.png"), text="q", label="bleu", split="train"))
    with caplog.at_level("WARNING", logger="model.train"):
        assert warn_about_rare_labels(rows) == ["bleu"]
    assert "'bleu' has 1 training row(s)" in caplog.text
    assert warn_about_rare_labels(rows[:6]) == []  # a small dataset: nothing is "rare"


def test_a_label_only_val_or_test_rows_carry_is_flagged_as_never_predicted(caplog) -> None:
    from model.data.rows import Row
    from model.train import warn_about_untrained_labels

    train_rows = [Row(image=Path(f"{i}.png"), text="q", label=("red", "blue")[i % 2], split="train")
                  for i in range(6)]
    with caplog.at_level("WARNING", logger="model.train"):
        assert warn_about_untrained_labels(["blue", "purple", "red"], train_rows) == ["purple"]
    assert "['purple'] have no training rows" in caplog.text


def test_a_finished_run_with_a_config_the_new_checks_refuse_still_loads() -> None:
    # Runs trained before the checks (e.g. with a misspelled metric) must still export and evaluate;
    # only a run about to train is validated.
    old = TrainConfig.from_dict({**TrainConfig().to_dict(), "early_stopping_metric": "val_f1"})
    assert old.early_stopping_metric == "val_f1"
    from model.errors import ConfigError

    with pytest.raises(ConfigError, match="val_f1"):
        old.validate()


def _csv_run(tmp_path: Path) -> tuple[Path, Path]:
    csv = _small_csv_dataset(tmp_path / "ds")
    run_dir = tmp_path / "run"
    argv = ["train", "--quiet", "--no-plots", "--run-dir", str(run_dir), "--data", str(csv), "--epochs", "1",
            "--image-size", "32", "--batch-size", "8", "--hidden-dim", "16", "--embed-dim", "8", "--num-threads", "1",
            "--encoder-kwargs",
            json.dumps({"image": {"width": 4, "out_dim": 8}, "text": {"embed_dim": 8, "hidden": 8}})]
    assert main(argv) == 0
    return csv, run_dir


def test_data_that_gained_a_label_is_refused_by_resume_and_evaluate_before_anything_changes(tmp_path: Path,
                                                                                           capsys) -> None:
    csv, run_dir = _csv_run(tmp_path)
    Image.new("RGB", (48, 48), (0, 200, 200)).save(csv.parent / "imgs" / "aqua.png")
    with csv.open("a", encoding="utf-8") as fh:
        fh.write("imgs/aqua.png,what color is it?,aqua,val\n")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--quiet", "--no-plots", "--run-dir", str(run_dir), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "the data's labels differ from those" in err and "new ['aqua']" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # labels.txt untouched
    assert main(["evaluate", str(run_dir), "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert "labels" in err and "aqua" in err and "Traceback" not in err


def test_evaluate_scores_against_the_checkpoints_labels_when_the_data_has_fewer(tmp_path: Path) -> None:
    from model.train import evaluate_run

    root = tmp_path / "ds"
    (root / "imgs").mkdir(parents=True)
    colors = {"blue": (30, 30, 220), "green": (30, 200, 30), "red": (220, 30, 30)}
    lines = ["image,text,label,split"]
    for i in range(36):
        label = list(colors)[i % 3]
        Image.new("RGB", (48, 48), colors[label]).save(root / "imgs" / f"{i}.png")
        lines.append(f"imgs/{i}.png,what color is it?,{label},{'val' if i % 9 == 4 else 'train'}")
    csv = root / "data.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    argv = ["train", "--quiet", "--no-plots", "--run-dir", str(run_dir), "--data", str(csv), "--epochs", "20",
            "--lr", "0.02", "--patience", "20", "--image-size", "32", "--batch-size", "8", "--hidden-dim", "16",
            "--embed-dim", "8", "--num-threads", "1", "--encoder-kwargs",
            json.dumps({"image": {"width": 4, "out_dim": 8}, "text": {"embed_dim": 8, "hidden": 8}})]
    assert main(argv) == 0
    assert evaluate_run(run_dir, "train", which="last")["train_accuracy"] == 1.0  # colours: learnt
    csv.write_text("\n".join([lines[0], *(x for x in lines[1:] if ",blue," not in x)]) + "\n", encoding="utf-8")
    # The data's own label list is now [green, red]: scored by it, green would be the model's class 0, 'blue'.
    assert evaluate_run(run_dir, "train", which="last")["train_accuracy"] == 1.0


def test_export_refuses_an_out_folder_that_is_not_a_bundle(tiny_run: Path, tmp_path: Path, capsys) -> None:
    own = tmp_path / "mine"
    own.mkdir()
    (own / "notes.txt").write_text("keep me")
    for out in (own, tiny_run, tiny_run.parent):
        assert main(["export", str(tiny_run), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out ") and "Traceback" not in err, err
    assert (own / "notes.txt").read_text() == "keep me" and (tiny_run / "best.pt").is_file()


def test_a_tied_validation_score_moves_best_pt_to_the_later_epoch_and_train_says_which(
        tiny_config, tmp_path: Path, monkeypatch, capsys) -> None:
    import torch

    import model.train as train_module

    monkeypatch.setattr(train_module, "evaluate_split", lambda state, split, **kw: {"val_accuracy": 0.5})
    run_dir = tmp_path / "run"
    assert main(_tiny_train_argv(tiny_config, run_dir, "--epochs", "3", "--patience", "5")) == 0
    assert torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)["epoch"] == 2  # the third
    assert "(best.pt: epoch 3 of 3, val_accuracy 0.5000)" in capsys.readouterr().out


def test_ctrl_c_during_training_says_how_to_resume_instead_of_a_traceback(tiny_config, tmp_path: Path,
                                                                        monkeypatch, capsys) -> None:
    import model.train as train_module

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    assert main(_tiny_train_argv(tiny_config, tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert err.strip() == f"interrupted; continue with `mmfusion train --run-dir {tmp_path / 'run'} --resume`"


def test_a_flickr8k_bundle_is_evaluated_with_onnx_on_its_own_folder(tmp_path: Path, capsys) -> None:
    from tests.model.test_datasets import build_flickr8k

    build_flickr8k(tmp_path / "f8k")
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    argv = ["train", "--quiet", "--no-plots", "--run-dir", str(run_dir), "--data", str(tmp_path / "f8k"),
            "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--hidden-dim", "16", "--embed-dim", "8",
            "--num-threads", "1", "--encoder-kwargs",
            json.dumps({"image": {"width": 4, "out_dim": 8}, "text": {"embed_dim": 8, "hidden": 8}})]
    assert main(argv) == 0
    assert main(["export", str(run_dir), "--out", str(bundle)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(bundle), "--data", str(tmp_path / "f8k"), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["kind"] == "bundle" and "accuracy" in body["metrics"]
    assert "text_to_image_R@1" in body["metrics"] and body["captions"] > 0
    assert main(["verify", str(bundle), "--data", str(tmp_path / "f8k")]) == 0  # its real samples, from the folder
    assert str(tmp_path / "f8k") in capsys.readouterr().out
