"""Training-side commands: train, export, verify, evaluate, ablate, build-default. ``main(argv)`` is test-callable."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

from model.config import TrainConfig
from model.errors import ConfigError, ParityError, UserError

FIELD_HELP: dict[str, str] = {
    "data": "'demo' (built-in synthetic scenes), a CSV/JSONL manifest with image,text,label[,split] columns "
            "(relative image paths are read from the manifest's folder), or a Flickr8k folder in its own layout",
    "captions": "CSV/JSONL of image,text[,split] caption pairs for the contrastive retrieval head",
    "run_dir": "folder for checkpoints, results.jsonl and the resolved config",
    "name": "model name written into the bundle manifest",
    "version": "model version written into the bundle manifest",
    "image_encoder": "image encoder from the registry",
    "text_encoder": "text encoder from the registry",
    "fusion": "fusion strategy from the registry",
    "image_size": "override the image encoder's input size",
    "max_length": "maximum text length in tokens (longer texts are truncated)",
    "hidden_dim": "width of the fusion layers",
    "embed_dim": "dimension of the shared image/text retrieval embedding",
    "epochs": "maximum number of epochs",
    "batch_size": "training batch size",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "contrastive_weight": "weight of the InfoNCE retrieval loss next to the classification loss",
    "seed": "random seed (data generation, initialisation, shuffling)",
    "demo_images": "number of images the demo generator renders",
    "demo_image_size": "side of the rendered demo images in pixels",
    "demo_dir": "where the demo dataset is generated (reused when it already matches)",
    "early_stopping_metric": "validation metric to select best.pt and stop early on (higher is better)",
    "patience": "epochs without improvement before early stopping",
    "num_threads": "torch intra-op threads (0 = all CPUs)",
    "encoder_kwargs": "JSON object of extra encoder arguments, e.g. '{\"image\": {\"width\": 16}}'",
}


def _field_docs() -> dict[str, str]:
    """The attribute docstrings under TrainConfig's fields (``x: int = 1`` then ``\"\"\"doc\"\"\"``).

    Read from the source with ``ast`` so a field added to TrainConfig gets help text from its own
    docstring without anyone remembering to update FIELD_HELP.
    """
    import ast
    import inspect
    import itertools
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig)))
    except (OSError, TypeError, SyntaxError):  # no source available (frozen app): FIELD_HELP only
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    docs = _field_docs()
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        kind: typing.Callable[[str], object] = str
        if hint in (bool, bool | None):
            kind = _parse_bool
        elif hint in (int, int | None):
            kind = int
        elif hint in (float, float | None):
            kind = float
        elif hint is dict or origin is dict or hint is list or origin is list:
            kind = json.loads
        text = FIELD_HELP.get(f.name) or docs.get(f.name) or f"TrainConfig.{f.name}"
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                            help=f"{text} (default: {default!r})".replace("%", "%%"))


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    if getattr(args, "resume", False):
        return _resume_config(args)
    base = TrainConfig.from_file(Path(args.config)).to_dict() if args.config else TrainConfig().to_dict()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            base[f.name] = value
    return TrainConfig.from_dict(base)


RESUME_OVERRIDABLE = frozenset({"epochs", "patience", "num_threads"})
"""What ``train --resume`` may change: when and how long to train, never what is trained on or how."""


def _resume_config(args: argparse.Namespace) -> TrainConfig:
    """``--resume`` continues a run as its config.json describes it. Without this, every flag not
    repeated fell back to its default: the demo data was generated into the working folder, the run's
    config.json and labels.txt were overwritten, and only then did the checkpoint fail to load."""
    run_dir = Path(args.run_dir) if args.run_dir else (
        Path(TrainConfig.from_file(Path(args.config)).run_dir) if args.config else None)
    if run_dir is None:
        raise ConfigError("--resume needs --run-dir: the folder of the run to continue")
    saved_file = run_dir / "config.json"
    if not saved_file.is_file():
        raise ConfigError(f"--resume: {saved_file} does not exist; is {run_dir} a training run? "
                          "(to start a new run there, leave out --resume)")
    saved = TrainConfig.from_file(saved_file)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    given = TrainConfig.from_dict({**saved.to_dict(), **flags}).with_absolute_paths()
    saved_abs = saved.with_absolute_paths()
    differ = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "run_dir"
              and getattr(given, f.name) != getattr(saved_abs, f.name)]
    refused = [name for name in differ if name not in RESUME_OVERRIDABLE]
    if refused:
        changes = ", ".join(f"--{n.replace('_', '-')} ({getattr(saved, n)!r} -> {getattr(given, n)!r})"
                            for n in refused)
        allowed = ", ".join(f"--{n.replace('_', '-')}" for n in sorted(RESUME_OVERRIDABLE))
        raise ConfigError(f"--resume continues {run_dir} as its config.json describes it, but {changes} differ; "
                          f"only {allowed} may change on resume. Train into a new --run-dir to change the rest.")
    return dataclasses.replace(saved, run_dir=str(run_dir), **{n: getattr(given, n) for n in differ})


def _register_baselines() -> None:
    """The image_only/text_only ablation baselines live in model/ablate.py; register them before any
    command builds a model, so their runs train, export and evaluate like any other strategy."""
    import model.ablate  # noqa: F401  (registration side effect)


def _best_epoch_note(run_dir: Path, cfg: object) -> str:
    """Which epoch best.pt (what export ships) holds, and by what: a run can stop improving early."""
    results = run_dir / "results.jsonl"
    if not (run_dir / "best.pt").is_file() or not results.is_file():
        return ""
    epochs = [json.loads(line) for line in results.read_text(encoding="utf-8").split("\n") if line.strip()]
    metric = getattr(cfg, "early_stopping_metric", "")
    scored = [e for e in epochs if metric in e]
    if not scored:
        return f" (best.pt: by training loss, {len(epochs)} epochs)"
    best = max(scored, key=lambda e: (e[metric], e["epoch"]))  # ties go to the later epoch, as train() saves
    return f" (best.pt: epoch {best['epoch']} of {len(epochs)}, {metric} {best[metric]:.4f})"


def cmd_train(args: argparse.Namespace) -> int:
    from model.train import train

    _register_baselines()
    cfg = _config_from_args(args)
    t0 = time.perf_counter()
    run_dir = train(cfg, progress=not args.quiet, resume=args.resume)
    print(f"trained in {time.perf_counter() - t0:.1f}s -> {run_dir}{_best_epoch_note(run_dir, cfg)}")
    if not args.no_plots:
        from model.plots import plot_run

        try:
            for path in plot_run(Path(run_dir)):
                print(f"plot: {path}")
        except Exception as exc:  # a plotting problem must not turn a finished training run into a failure
            print(f"warning: could not write plots for {run_dir}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from model.export import export_bundle
    from model.quantize import Int8Options

    _register_baselines()
    options = Int8Options(
        calibration_samples=args.calibration_samples,
        min_agreement=args.min_agreement,
        agreement_margin=args.agreement_margin,
        require_speedup=not args.keep_slower_int8,
        float_fallback=args.float_search,
    )
    manifest = export_bundle(Path(args.run), Path(args.out), which=args.checkpoint, progress=not args.quiet,
                             int8=args.int8, int8_options=options, fp16=args.fp16)
    summary = {
        "bundle": str(args.out),
        "precisions": manifest.precisions(),
        "parity": manifest.parity.model_dump(),
        "quality": {k: v.model_dump() for k, v in manifest.quality.items()},
    }
    if args.int8:
        from model.export import QUANTIZATION_REPORT
        from model.quantize import format_report

        summary["int8_files"] = {role: spec.variants["int8"].file for role, spec in manifest.graphs.items()}  # type: ignore[index]
        if args.quiet:  # export_bundle printed the speed table already unless quiet; always show it once
            print(format_report(json.loads((Path(args.out) / QUANTIZATION_REPORT).read_text(encoding="utf-8"))))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from model.verify import verify_bundle

    if args.run:
        _register_baselines()
    report = verify_bundle(
        Path(args.bundle),
        run_dir=Path(args.run) if args.run else None,
        data=Path(args.data) if args.data else None,
        split=args.split,
        margin=args.margin,
        min_int8_agreement=args.min_int8_agreement,
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n", encoding="utf-8")
    return 0 if report["ok"] else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    from model.evaluate import EvaluationError, evaluate_target, format_table, to_json

    _register_baselines()
    try:
        ev = evaluate_target(Path(args.target), args.split, which=args.checkpoint, precision=args.precision,
                             data=Path(args.data) if args.data else None,
                             captions=Path(args.captions) if args.captions else None)
    except (EvaluationError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(to_json(ev) if args.json else format_table(ev), end="" if not args.json else "\n")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from model.ablate import ablate, format_table

    fusions = [f.strip() for f in args.fusions.split(",") if f.strip()] if args.fusions else None
    overrides = {"epochs": args.epochs, "demo_images": args.demo_images, "seed": args.seed}
    rows = ablate(pretrained=args.pretrained, work_dir=Path(args.work_dir), out_dir=Path(args.out_dir),
                  fusions=fusions, overrides=overrides, progress=not args.quiet)
    print(format_table(rows))
    print(f"written: {Path(args.out_dir) / 'ablation.json'}, {Path(args.out_dir) / 'ablation.md'}")
    return 0


def cmd_build_default(args: argparse.Namespace) -> int:
    from model.default_bundle import build_default

    _register_baselines()
    out = Path(args.out)
    if args.if_missing and (out / "manifest.json").is_file():
        print(f"default bundle already present at {out}")
        return 0
    build_default(out, progress=not args.quiet, fast=args.fast, int8=args.int8,
                  int8_image_encoder=args.int8_image_encoder, fp16=args.fp16)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfusion", description="mmfusion training and export commands")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a fusion model", description="Train a fusion model. Options override "
                       "the --config JSON file, which overrides the defaults shown.")
    p.add_argument("--config", help="JSON file with TrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true",
                   help="do not write training_curves.png and confusion_matrix_val.png into the run folder")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a training run to an ONNX model bundle",
                       description="Export a run to a bundle (ONNX graphs + tokenizer + labels + manifest), "
                       "refusing to write it if ONNX Runtime does not reproduce PyTorch.")
    p.add_argument("run", help="training run folder (holding best.pt)")
    p.add_argument("--out", required=True, help="bundle folder to write (replaced if it exists)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"],
                   help="which checkpoint of the run to export (default: best)")
    p.add_argument("--int8", action="store_true",
                   help="also write an int8 variant per graph (static QDQ for CNNs, dynamic for text encoders, "
                   "chosen by measured speed and agreement; a graph INT8 does not speed up keeps its fp32 file)")
    p.add_argument("--calibration-samples", type=int, default=128,
                   help="training samples that calibrate the static INT8 ranges (default: 128)")
    p.add_argument("--min-agreement", type=float, default=0.99,
                   help="pipeline top-1 agreement with fp32 (val split) the int8 variant must keep; graphs revert "
                   "to fp32 until it does (default: 0.99)")
    p.add_argument("--agreement-margin", type=float, default=1.0,
                   help="standard errors of the val-split estimate by which that agreement must clear the bar, so "
                   "that sampling noise alone does not record the variant under it on the test split (default: 1.0, "
                   "i.e. 0.9931 on 1,000 val rows; 0 = the bar itself)")
    p.add_argument("--keep-slower-int8", action="store_true",
                   help="keep a faithful INT8 graph even when it is not faster than fp32 on this CPU")
    p.add_argument("--float-search", action=argparse.BooleanOptionalAction, default=True,
                   help="when every static INT8 candidate of a graph misses a fidelity gate, search which module "
                   "blocks to leave in float, ranked by measured sensitivity (about 9 minutes for EfficientNet-Lite0 "
                   "on 2 cores; default: on)")
    p.add_argument("--fp16", action="store_true",
                   help="also write an fp16 variant per graph for GPUs (float32 inputs/outputs; its top-1 agreement "
                   "with fp32 is measured on the test split and recorded; `MMFUSION_PRECISION=auto` picks it on CUDA)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="re-check a bundle: manifest, sha256, ONNX checker, ORT loads and runs, "
                       "variant agreement", description="Re-run every bundle check and print a JSON report; "
                       "exit code 0 when everything passes, 1 otherwise.")
    p.add_argument("bundle", help="bundle folder (holding manifest.json)")
    p.add_argument("--run", help="the training run the bundle came from: also re-measure fp32 parity against "
                   "PyTorch, and take real samples from its dataset")
    p.add_argument("--data", help="CSV/JSONL manifest (image,text,label,split), or a Flickr8k folder, of real "
                   "samples to measure agreement on (default: the run's data, else demo data next to the bundle, "
                   "else random inputs)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="split of the real samples to use (default: test)")
    p.add_argument("--margin", type=float, default=0.01,
                   help="how far a re-measured agreement may fall below the recorded one (default: 0.01)")
    p.add_argument("--min-int8-agreement", type=float, default=0.99,
                   help="minimum top-1 agreement of int8 with fp32 on real samples (default: 0.99)")
    p.add_argument("--report", help="also write the JSON report to this file")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("evaluate", help="held-out metrics of a run (PyTorch) or a bundle (ONNX Runtime)",
                       description="Accuracy, macro-F1 (and AUROC for binary tasks); Recall@1/5/10 and median "
                       "rank in both directions for retrieval.")
    p.add_argument("target", help="training run folder or bundle folder")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="split to evaluate (default: test)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"],
                   help="for a run: which checkpoint (default: best)")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "fp16", "int8"],
                   help="for a bundle: which precision variant to run (default: fp32)")
    p.add_argument("--data", help="for a bundle: labelled CSV/JSONL manifest (image,text,label,split), or the "
                   "Flickr8k folder it was trained on (its matching rows and caption pairs); default: the demo "
                   "data build-default leaves next to the bundle")
    p.add_argument("--captions", help="for a bundle: CSV/JSONL caption pairs (image,text,split) for retrieval")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("ablate", help="train every fusion strategy plus image-only/text-only baselines, one table",
                       description="Trains each registered fusion strategy and the two single-modality baselines "
                       "on the same demo data; writes benchmarks/results/ablation.{json,md}.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fast", action="store_true", help="small from-scratch encoders (the default)")
    mode.add_argument("--pretrained", action="store_true",
                      help="the real frozen encoders (EfficientNet-Lite0 + MiniLM)")
    p.add_argument("--fusions", help="comma-separated strategies to run (default: every registered one + baselines)")
    p.add_argument("--epochs", type=int, help="override the maximum epochs per model")
    p.add_argument("--demo-images", type=int, help="override the number of demo images")
    p.add_argument("--seed", type=int, help="override the seed (default: 0)")
    p.add_argument("--work-dir", default="runs/ablation", help="where runs and bundles go (default: runs/ablation)")
    p.add_argument("--out-dir", default="benchmarks/results",
                   help="where ablation.json and ablation.md go (default: benchmarks/results)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("build-default", help="generate demo data, train, export and index the default bundle")
    p.add_argument("--out", default="models/default", help="bundle folder to write (default: models/default)")
    p.add_argument("--if-missing", action="store_true", help="do nothing if OUT/manifest.json exists")
    p.add_argument("--fast", action="store_true", help="tiny from-scratch model (seconds; for tests)")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="measure INT8 variants of each graph and keep the faster faithful ones (as `mmfusion "
                   "export --int8`, but only one GPTQ-rounded candidate for the image encoder, see README 'INT8'; "
                   "about 40 s for MiniLM and the head plus 75 s for the image encoder's candidate on 2 cores; "
                   "default: on)")
    p.add_argument("--int8-image-encoder", action="store_true",
                   help="measure every static QDQ candidate of the image encoder, then the per-block float search "
                   "if none is faithful (about 10 more minutes on 2 cores; see README 'INT8')")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="write an fp16 variant per graph for GPUs (float32 inputs/outputs; its top-1 agreement "
                   "with fp32 is measured on the test split and recorded; `MMFUSION_PRECISION=auto` picks it on "
                   "CUDA; about 16 s; default: on)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_build_default)
    return parser


TRAIN_COMMANDS = ("train", "export", "verify", "evaluate", "ablate", "build-default")


def main(argv: list[str] | None = None) -> int:
    """Run one command. What the user can fix (``model.errors.UserError``: a bad flag, file or dataset;
    or a named file that is missing or cannot be opened) is printed as ``error: <message>`` with exit
    code 2, not a traceback; a refused export (parity) exits 1 the same way. Anything else is a bug and
    keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        # Only the file errors a path on the command line causes; a connection or timeout error is a bug.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = ""
        if args.func is cmd_train:  # last.pt holds every finished epoch
            run_dir = getattr(args, "run_dir", None) or TrainConfig().run_dir
            hint = f"; continue with `mmfusion train --run-dir {run_dir} --resume`"
        print(f"interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
