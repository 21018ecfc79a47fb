"""``mmfusion evaluate RUN_OR_BUNDLE``: held-out metrics of a training run or an exported bundle.

A run is evaluated in PyTorch from its checkpoint (the numbers training reported); a bundle is
evaluated through the serving pipeline (ONNX Runtime, any precision variant), which is what
users actually get, so the two can be compared to see what export or INT8 cost.

Metrics come from ``model/metrics.py``: accuracy and macro-F1 (plus AUROC for binary tasks) for
classification; Recall@1/5/10 and median rank in both directions for caption retrieval, where
image->text takes the best rank over all captions of an image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import UserError
from model.metrics import classification_metrics, retrieval_metrics

SPLITS = ("train", "val", "test")


class EvaluationError(UserError, ValueError):
    """The target cannot be evaluated as asked (not a run or bundle, no data, empty split)."""


@dataclass
class Evaluation:
    target: str
    kind: str  # "run" | "bundle"
    split: str
    metrics: dict[str, float]
    """Unprefixed keys: ``accuracy``, ``macro_f1``, ``auroc``, ``text_to_image_R@1``, ..."""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "split": self.split, "metrics": self.metrics,
                **self.details}


def is_bundle(path: Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def is_run(path: Path) -> bool:
    return (Path(path) / "config.json").is_file() and any((Path(path) / f"{w}.pt").is_file() for w in ("best", "last"))


def _strip(metrics: dict[str, float], split: str) -> dict[str, float]:
    prefix = f"{split}_"
    return {k.removeprefix(prefix): float(v) for k, v in metrics.items()}


def evaluate_run_dir(run_dir: Path, split: str = "test", which: str = "best") -> Evaluation:
    """PyTorch metrics of a checkpoint on one split (the training code's own evaluation)."""
    from model.train import evaluate_run

    metrics = _strip(evaluate_run(Path(run_dir), split, which), split)
    if not metrics:
        raise EvaluationError(f"{run_dir}: the {split!r} split has no rows and no captions")
    return Evaluation(str(run_dir), "run", split, metrics, {"checkpoint": which, "runtime": "pytorch"})


def _bundle_data(bundle_dir: Path, data: Path | None, captions: Path | None) -> tuple[Path | None, Path | None]:
    """Explicit manifests win; otherwise the demo data ``build-default`` leaves beside the bundle."""
    if data is None and captions is None:
        from model.verify import demo_data_for

        qa = demo_data_for(bundle_dir)
        if qa is not None:
            cap = qa.with_name("captions.jsonl")
            return qa, cap if cap.is_file() else None
    return data, captions


def evaluate_bundle_dir(
    bundle_dir: Path,
    split: str = "test",
    *,
    precision: str = "fp32",
    data: Path | None = None,
    captions: Path | None = None,
    batch: int = 32,
) -> Evaluation:
    """Serving-pipeline metrics of a bundle on a labelled manifest (and optionally caption pairs)."""
    from app.core.config import Settings
    from app.inference.pipeline import ModelPipeline
    from model.data.rows import load_rows
    from model.quantize import load_samples

    bundle_dir = Path(bundle_dir)
    data, captions = _bundle_data(bundle_dir, data, captions)
    if data is None and captions is None:
        raise EvaluationError(
            f"{bundle_dir} is a bundle and no evaluation data was found: pass --data MANIFEST (image,text,label,split)"
            " and/or --captions MANIFEST (image,text,split)"
        )
    pipe = ModelPipeline(bundle_dir, Settings(precision=precision, providers="CPUExecutionProvider"))  # type: ignore[arg-type]
    labels = list(pipe.manifest.labels)
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {"precision": pipe.precision, "runtime": "onnxruntime"}
    flickr_captions: list | None = None
    if data is not None and Path(data).is_dir():
        # A Flickr8k folder, as the bundle was trained on it: its matching rows (the classification task) and
        # its caption pairs (retrieval), drawn with the training code's own seed.
        from model.data.flickr8k import is_flickr8k_root
        from model.data.prepared import flickr8k_task

        if not is_flickr8k_root(Path(data)):
            raise EvaluationError(f"{data} is a folder without the Flickr8k layout; give a CSV/JSONL manifest")
        ds, matching = flickr8k_task(Path(data))
        rows = [r for r in matching if r.split == split]
        flickr_captions = [r for r in ds.pairs if r.split == split]
    elif data is not None:
        rows = [r for r in load_rows(Path(data), labels=labels) if r.split == split]
    if data is not None:
        if rows:
            s = load_samples(rows, pipe.manifest.image, labels)
            probs = np.concatenate([
                pipe.classify(s.pixel_values[s.image_index[i : i + batch]], s.texts[i : i + batch])[0]
                for i in range(0, len(s), batch)
            ])
            assert s.labels is not None
            metrics.update(classification_metrics(s.labels, probs))
            details["classification_rows"] = len(rows)
        details["data"] = str(data)
    if captions is not None or flickr_captions is not None:
        caps = flickr_captions if flickr_captions is not None else [
            r for r in load_rows(Path(captions), require_label=False) if r.split == split]  # type: ignore[arg-type]
        if caps:
            s = load_samples(caps, pipe.manifest.image, None)
            img = np.concatenate([pipe.embed_images(s.pixel_values[i : i + batch])
                                  for i in range(0, len(s.pixel_values), batch)])
            txt = np.concatenate([pipe.embed_texts(s.texts[i : i + batch])[0] for i in range(0, len(s), batch)])
            metrics.update(retrieval_metrics(img, txt, s.image_index, s.texts))
            details["captions"] = len(caps)
        details["captions_file"] = str(captions if captions is not None else data)
    if not metrics:
        raise EvaluationError(f"no rows of split {split!r} in {data or ''} {captions or ''}".strip())
    return Evaluation(str(bundle_dir), "bundle", split, metrics, details)


def evaluate_target(target: Path, split: str = "test", *, which: str = "best", precision: str = "fp32",
                    data: Path | None = None, captions: Path | None = None) -> Evaluation:
    target = Path(target)
    if split not in SPLITS:
        raise EvaluationError(f"split must be one of {SPLITS}, got {split!r}")
    if is_bundle(target):
        return evaluate_bundle_dir(target, split, precision=precision, data=data, captions=captions)
    if is_run(target):
        return evaluate_run_dir(target, split, which)
    raise EvaluationError(f"{target} is neither a training run (config.json + best.pt) nor a bundle (manifest.json)")


@dataclass
class Predictions:
    y_true: np.ndarray
    probabilities: np.ndarray
    labels: list[str]


def predict_split(run_dir: Path, split: str = "val", which: str = "best", batch: int = 64) -> Predictions:
    """Class probabilities of a checkpoint on one split's labelled rows (PyTorch), e.g. for a confusion matrix.

    Only the split's own images are preprocessed, not the whole dataset's.
    """
    import torch

    from app.preprocessing.text import TextTokenizer
    from model.data.prepared import prepare_data
    from model.quantize import load_samples
    from model.train import load_built

    built, cfg, ckpt = load_built(Path(run_dir), which)
    labels: list[str] = list(ckpt["labels"])
    rows = [r for r in prepare_data(cfg, progress=False).split(split) if r.label is not None]
    if not rows:
        raise EvaluationError(f"{run_dir}: the {split!r} split has no labelled rows")
    s = load_samples(rows, built.image_pre, labels)
    tok = TextTokenizer(Path(run_dir) / "tokenizer.json", built.max_length)
    model = built.model.eval()
    probs = []
    with torch.no_grad():
        for i in range(0, len(s), batch):
            enc = tok.encode(s.texts[i : i + batch])
            pix = torch.from_numpy(s.pixel_values[s.image_index[i : i + batch]])
            logits = model(pix, torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
            probs.append(torch.softmax(logits, -1).numpy())
    assert s.labels is not None
    return Predictions(s.labels, np.concatenate(probs), labels)


def format_table(ev: Evaluation) -> str:
    """Plain-text table: classification metrics, then retrieval recall per direction."""
    m = ev.metrics
    head = f"{ev.kind} {ev.target} | split {ev.split}"
    extra = ", ".join(f"{k} {v}" for k, v in ev.details.items() if k in ("precision", "runtime", "checkpoint"))
    lines = [head + (f" | {extra}" if extra else ""), ""]
    cls = [("accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("AUROC", "auroc")]
    shown = [(name, m[key]) for name, key in cls if key in m]
    if shown:
        lines.append(f"{'classification':<16}" + "".join(f"{name:>10}" for name, _ in shown))
        lines.append(f"{'':<16}" + "".join(f"{v:>10.4f}" for _, v in shown))
        lines.append("")
    directions = [("text -> image", "text_to_image"), ("image -> text", "image_to_text")]
    if any(f"{d}_R@1" in m for _, d in directions):
        lines.append(f"{'retrieval':<16}{'R@1':>10}{'R@5':>10}{'R@10':>10}{'median rank':>13}")
        for name, d in directions:
            if f"{d}_R@1" in m:
                lines.append(f"{name:<16}" + "".join(f"{m[f'{d}_R@{k}']:>10.4f}" for k in (1, 5, 10))
                             + f"{m[f'{d}_median_rank']:>13.1f}")
    return "\n".join(lines).rstrip() + "\n"


def to_json(ev: Evaluation) -> str:
    return json.dumps(ev.to_dict(), indent=2)
