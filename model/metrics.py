"""Evaluation metrics as flat dicts with direction-qualified keys (``text_to_image_R@1``)."""

from __future__ import annotations

import numpy as np

SELECTABLE_METRICS: tuple[str, ...] = (
    "accuracy", "macro_f1", "auroc",
    *(f"{direction}_R@{k}" for direction in ("text_to_image", "image_to_text") for k in (1, 5, 10)),
)
"""The metrics where higher is better, so training may select checkpoints on them (``val_`` + name)."""


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, prefix: str = "") -> dict[str, float]:
    """Accuracy, macro-F1 over classes present in ``y_true``, and AUROC for binary tasks."""
    y_pred = probs.argmax(1)
    out = {f"{prefix}accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0}
    f1s = []
    for c in np.unique(y_true):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        denom = 2 * tp + fp + fn
        f1s.append(2 * tp / denom if denom else 0.0)
    out[f"{prefix}macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
    if probs.shape[1] == 2 and len(np.unique(y_true)) == 2:
        out[f"{prefix}auroc"] = auroc(y_true == 1, probs[:, 1])
    return out


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney U formulation with average ranks for ties."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    text_strings: list[str] | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """Recall@1/5/10 and median rank in both directions.

    ``text_to_image[j]`` is the index of caption j's image. Image->text uses the best rank over
    all captions of an image. Text->image counts a retrieved image as a hit when it is the
    caption's own image *or* an image one of whose own captions is identical to the query
    (synthetic scenes can legitimately share a caption word for word).
    """
    sims = text_emb @ image_emb.T  # [T, I]
    n_img = image_emb.shape[0]
    positives = np.zeros_like(sims, dtype=bool)
    positives[np.arange(len(text_to_image)), text_to_image] = True
    if text_strings is not None:
        by_text: dict[str, set[int]] = {}
        for j, s in enumerate(text_strings):
            by_text.setdefault(s, set()).add(int(text_to_image[j]))
        for j, s in enumerate(text_strings):
            positives[j, list(by_text[s])] = True
    order = np.argsort(-sims, axis=1)
    hit = np.take_along_axis(positives, order, axis=1)
    t2i_rank = hit.argmax(1) + 1
    out: dict[str, float] = {}
    for k in (1, 5, 10):
        out[f"{prefix}text_to_image_R@{k}"] = float((t2i_rank <= k).mean())
    out[f"{prefix}text_to_image_median_rank"] = float(np.median(t2i_rank))
    order_i = np.argsort(-sims.T, axis=1)  # [I, T]
    own = np.zeros((n_img, len(text_to_image)), dtype=bool)
    own[text_to_image, np.arange(len(text_to_image))] = True
    hit_i = np.take_along_axis(own, order_i, axis=1)
    has_caption = own.any(1)
    i2t_rank = hit_i.argmax(1)[has_caption] + 1
    for k in (1, 5, 10):
        out[f"{prefix}image_to_text_R@{k}"] = float((i2t_rank <= k).mean()) if len(i2t_rank) else 0.0
    out[f"{prefix}image_to_text_median_rank"] = float(np.median(i2t_rank)) if len(i2t_rank) else 0.0
    return out
