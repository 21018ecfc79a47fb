"""PNG plots written into a run folder after training: learning curves and a confusion matrix.

Matplotlib runs on the Agg backend (no display, no GUI toolkit), so plotting works in CI,
containers and over SSH alike.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # before pyplot is imported anywhere in this process
from matplotlib import pyplot as plt

CURVES_FILE = "training_curves.png"


def confusion_file(split: str) -> str:
    return f"confusion_matrix_{split}.png"


def read_results(run_dir: Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_training_curves(run_dir: Path) -> Path:
    """Training loss (left) and every validation score in [0, 1] (right), per epoch."""
    records = read_results(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/results.jsonl is empty")
    epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(records)]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r.get("train_loss", np.nan) for r in records], marker="o", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    keys = sorted({k for r in records for k in r if k.startswith("val_") and "median" not in k})
    for key in keys:
        ax_val.plot(epochs, [r.get(key, np.nan) for r in records], marker="o", label=key.removeprefix("val_"))
    ax_val.set_xlabel("epoch")
    ax_val.set_ylim(0, 1.02)
    ax_val.set_title("validation metrics")
    ax_val.grid(alpha=0.3)
    if keys:
        ax_val.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    for ax in (ax_loss, ax_val):
        ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
    fig.tight_layout()
    out = Path(run_dir) / CURVES_FILE
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def plot_confusion_matrix(run_dir: Path, split: str = "val", which: str = "best") -> Path:
    """Row-normalised confusion matrix of the checkpoint on ``split`` (counts in each cell)."""
    from model.evaluate import predict_split

    pred = predict_split(Path(run_dir), split, which)
    n = len(pred.labels)
    cm = confusion_matrix(pred.y_true, pred.probabilities.argmax(1), n)
    rates = cm / cm.sum(1, keepdims=True).clip(min=1)
    side = max(5.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), pred.labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), pred.labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = float((pred.probabilities.argmax(1) == pred.y_true).mean())
    ax.set_title(f"{split} confusion matrix (accuracy {acc:.3f}, {len(pred.y_true)} samples)")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    out = Path(run_dir) / confusion_file(split)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(run_dir: Path, split: str = "val") -> list[Path]:
    """Both plots; the confusion matrix is skipped (not failed) when the split has no labelled rows."""
    from model.evaluate import EvaluationError

    paths = [plot_training_curves(run_dir)]
    with contextlib.suppress(EvaluationError):
        paths.append(plot_confusion_matrix(run_dir, split))
    return paths
