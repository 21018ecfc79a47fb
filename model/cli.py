"""Training-side commands: train, export, verify, build-default. ``main(argv)`` is test-callable."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

from model.config import TrainConfig

FIELD_HELP: dict[str, str] = {
    "data": "'demo' (built-in synthetic scenes), or a CSV/JSONL manifest with image,text,label[,split] columns",
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


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        hint = hints[f.name]
        kind: type = str
        if hint in (int, int | None):
            kind = int
        elif hint is float:
            kind = float
        elif f.name == "encoder_kwargs":
            kind = json.loads  # type: ignore[assignment]
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                            help=f"{FIELD_HELP.get(f.name, '')} (default: {default!r})")


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = TrainConfig.from_file(Path(args.config)).to_dict() if args.config else TrainConfig().to_dict()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            base[f.name] = value
    return TrainConfig.from_dict(base)


def cmd_train(args: argparse.Namespace) -> int:
    from model.train import train

    cfg = _config_from_args(args)
    t0 = time.perf_counter()
    run_dir = train(cfg, progress=not args.quiet, resume=args.resume)
    print(f"trained in {time.perf_counter() - t0:.1f}s -> {run_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from model.export import export_bundle

    manifest = export_bundle(Path(args.run), Path(args.out), which=args.checkpoint, progress=not args.quiet)
    print(json.dumps({"bundle": str(args.out), "parity": manifest.parity.model_dump()}, indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from model.verify import verify_bundle

    report = verify_bundle(Path(args.bundle))
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def cmd_build_default(args: argparse.Namespace) -> int:
    from model.default_bundle import build_default

    out = Path(args.out)
    if args.if_missing and (out / "manifest.json").is_file():
        print(f"default bundle already present at {out}")
        return 0
    build_default(out, progress=not args.quiet, fast=args.fast)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfusion", description="mmfusion training and export commands")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a fusion model", description="Train a fusion model. Options override "
                       "the --config JSON file, which overrides the defaults shown.")
    p.add_argument("--config", help="JSON file with TrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a training run to an ONNX model bundle")
    p.add_argument("run", help="training run folder (holding best.pt)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="re-check a bundle: manifest, sha256, ONNX checker, ORT loads and runs")
    p.add_argument("bundle")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("build-default", help="generate demo data, train, export and index the default bundle")
    p.add_argument("--out", default="models/default")
    p.add_argument("--if-missing", action="store_true", help="do nothing if OUT/manifest.json exists")
    p.add_argument("--fast", action="store_true", help="tiny from-scratch model (seconds; for tests)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_build_default)
    return parser


TRAIN_COMMANDS = ("train", "export", "verify", "build-default")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
