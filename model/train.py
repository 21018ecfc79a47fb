"""The training loop: seeded, per-epoch validation, results.jsonl, last/best checkpoints.

Classification (answer the question about the image) and the contrastive caption<->image
objective are trained jointly, so one bundle serves both /v1/classify and /v1/search.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from app.bundle.manifest import ImagePreprocessing
from app.preprocessing.image import preprocess_pil
from app.preprocessing.text import TextTokenizer
from model.build import BuiltModel, build_model
from model.config import TrainConfig
from model.data.prepared import PreparedData, prepare_data
from model.data.rows import Row
from model.errors import CheckpointMismatchError, ConfigError
from model.feature_cache import (
    EncodeImages,
    EncodeTexts,
    FeatureCache,
    cache_dir_for,
    encoder_identity,
    file_sha256,
    image_features,
    is_frozen,
    text_features,
)
from model.fusion_model import FusionModel
from model.heads import info_nce
from model.metrics import classification_metrics, retrieval_metrics

log = logging.getLogger(__name__)

FROZEN_PREFIXES = {"image_encoder": "image_encoder.", "text_encoder": "text_encoder."}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_images(paths: list[Path], spec: ImagePreprocessing, progress: bool = True) -> torch.Tensor:
    """Preprocess every image once with the serving code path; the tensor is reused every epoch."""
    out = np.empty((len(paths), 3, spec.size, spec.size), dtype=np.float32)
    for i, p in enumerate(tqdm(paths, desc="preprocess images", disable=not progress, leave=False)):
        with Image.open(p) as img:
            out[i] = preprocess_pil(img, spec)
    return torch.from_numpy(out)


@dataclass
class TrainState:
    """The model plus where its encoder outputs come from.

    ``encode_images(idx)`` / ``encode_texts(texts)`` either run the encoder (trainable encoders:
    on preprocessed pixels / tokenised text) or look up cached features (frozen encoders), so
    the loop and the evaluation are the same code in both cases.
    """

    model: FusionModel
    built: BuiltModel
    data: PreparedData
    tokenizer: TextTokenizer
    encode_images: EncodeImages
    encode_texts: EncodeTexts
    images: torch.Tensor | None = None
    """Preprocessed pixels of every image; only loaded when the image encoder is trained."""
    cache: FeatureCache | None = None


def _encode(tok: TextTokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok.encode(texts)
    return torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask)


def frozen_identities(built: BuiltModel, cfg: TrainConfig) -> dict[str, str]:
    """Weight digests of the frozen encoders (their features are cached, their weights not checkpointed)."""
    model = built.model
    out = {}
    if is_frozen(model.image_encoder):
        out["image_encoder"] = encoder_identity(cfg.image_encoder, model.image_encoder, built.image_kwargs)
    if is_frozen(model.text_encoder):
        out["text_encoder"] = encoder_identity(cfg.text_encoder, model.text_encoder, built.text_kwargs)
    return out


def make_state(
    built: BuiltModel,
    cfg: TrainConfig,
    data: PreparedData,
    tokenizer_file: Path,
    run_dir: Path,
    *,
    identities: dict[str, str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> TrainState:
    """Wire each modality to a live encoder or to cached frozen features (computed once, on disk)."""
    model = built.model
    tokenizer = TextTokenizer(tokenizer_file, built.max_length)
    identities = frozen_identities(built, cfg) if identities is None else identities
    cache = FeatureCache(cache_dir_for(run_dir, cfg.encoder_kwargs)) if use_cache and identities else None
    images: torch.Tensor | None = None
    encode_images: EncodeImages
    encode_texts: EncodeTexts
    if cache is not None and "image_encoder" in identities:
        encode_images = image_features(
            model.image_encoder, identities["image_encoder"], data.image_paths, built.image_pre, cache,
            progress=progress,
        )
    else:
        pixels = images = load_images(data.image_paths, built.image_pre, progress)

        def encode_images(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return model.encode_image(pixels[idx])

    if cache is not None and "text_encoder" in identities:
        texts = [r.text for r in data.rows] + [r.text for r in data.captions]
        encode_texts = text_features(
            model.text_encoder, identities["text_encoder"], tokenizer, file_sha256(tokenizer_file), texts, cache,
            progress=progress,
        )
    else:

        def encode_texts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            ids, mask = _encode(tokenizer, texts)
            pooled, tokens = model.encode_text(ids, mask)
            return pooled, tokens, mask

    return TrainState(model, built, data, tokenizer, encode_images, encode_texts, images, cache)


@torch.no_grad()
def evaluate_split(state: TrainState, split: str, batch_size: int = 128) -> dict[str, float]:
    """Accuracy/macro-F1 on the split's rows, plus retrieval recall on its captions."""
    model, data = state.model, state.data
    model.eval()
    rows = data.split(split)
    metrics: dict[str, float] = {}
    if rows:
        label_idx = {lab: i for i, lab in enumerate(data.labels)}
        probs = []
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            idx = torch.tensor([data.image_index[r.image] for r in chunk])
            ip, ir = state.encode_images(idx)
            tp, tt, mask = state.encode_texts([r.text for r in chunk])
            probs.append(torch.softmax(model.classify_features(ip, ir, tp, tt, mask), -1).numpy())
        y = np.array([label_idx[r.label] for r in rows if r.label is not None])
        metrics.update(classification_metrics(y, np.concatenate(probs), prefix=f"{split}_"))
    caps = data.caption_split(split)
    if caps:
        img_ids = sorted({data.image_index[r.image] for r in caps})
        local = {g: i for i, g in enumerate(img_ids)}
        img_emb = []
        for s in range(0, len(img_ids), batch_size):
            pooled, regions = state.encode_images(torch.tensor(img_ids[s : s + batch_size]))
            img_emb.append(model.contrastive.embed_image(pooled, regions).numpy())
        txt_emb = []
        for s in range(0, len(caps), batch_size):
            pooled, _, _ = state.encode_texts([r.text for r in caps[s : s + batch_size]])
            txt_emb.append(model.contrastive.embed_text(pooled).numpy())
        owner = np.array([local[data.image_index[r.image]] for r in caps])
        metrics.update(
            retrieval_metrics(
                np.concatenate(img_emb), np.concatenate(txt_emb), owner, [r.text for r in caps], prefix=f"{split}_"
            )
        )
    return metrics


def _caption_lookup(data: PreparedData) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for r in data.captions:
        out.setdefault(data.image_index[r.image], []).append(r.text)
    return out


LR_SCHEDULES = ("constant", "cosine")
WARMUP_FRACTION = 0.05


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` at optimiser step ``step`` (0-based) of ``total_steps``.

    ``cosine``: linear warm-up over the first 5% of steps, then cosine decay to 0. A pure
    function of the step (no scheduler state), so a resumed run continues exactly where it was.
    """
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ConfigError(f"unknown lr_schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def trainable_state_dict(model: FusionModel, identities: dict[str, str]) -> dict[str, torch.Tensor]:
    """The state dict minus frozen encoders: those are rebuilt from their pretrained weights on load
    (and checked against ``identities``), which keeps checkpoints a few MB instead of ~100 MB."""
    skip = tuple(FROZEN_PREFIXES[role] for role in identities)
    return {k: v for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}


def load_trainable_state(built: BuiltModel, cfg: TrainConfig, ckpt: dict) -> None:
    """Load a checkpoint's weights; frozen encoders left out of it must be the very weights it was trained with."""
    model = built.model
    recorded: dict[str, str] = dict(ckpt.get("frozen_encoders") or {})
    if recorded:
        current = frozen_identities(built, cfg)
        for role, identity in recorded.items():
            if current.get(role) != identity:
                raise CheckpointMismatchError(
                    f"the checkpoint was trained with a frozen {role} whose weights differ from the ones installed now "
                    f"({identity[:12]} vs {str(current.get(role))[:12]}); reinstall the original weights or retrain"
                )
    result = model.load_state_dict(ckpt["state_dict"], strict=False)
    allowed = tuple(FROZEN_PREFIXES[role] for role in recorded)
    missing = [k for k in result.missing_keys if not (allowed and k.startswith(allowed))]
    if missing or result.unexpected_keys:
        raise CheckpointMismatchError(f"checkpoint does not fit the model: missing {missing[:10]}, "
                                      f"unexpected {result.unexpected_keys[:10]}")


def trained_tasks(cfg: TrainConfig, data: PreparedData) -> list[str]:
    """What the run really trains: retrieval only when the contrastive head sees caption pairs.

    Without them the image/text projections stay at their random initialisation, and a bundle that
    advertised retrieval would serve embeddings in which unrelated images score 0.99 against each other."""
    if cfg.contrastive_weight > 0 and data.caption_split("train"):
        return ["classification", "retrieval"]
    return ["classification"]


def warn_about_rare_labels(rows: list[Row]) -> list[str]:
    """Labels with at most 2 training rows where the typical label has 10 or more: most often a typo in
    the manifest (``bleu`` for ``blue``), which would silently become a class of its own."""
    counts = Counter(r.label for r in rows if r.label is not None)
    if not counts:
        return []
    typical = float(np.median(list(counts.values())))
    rare = sorted(label for label, n in counts.items() if n <= 2 and typical >= 10)
    for label in rare:
        log.warning("label %r has %d training row(s) where the median label has %d: a typo in the manifest?",
                    label, counts[label], typical)
    return rare


def warn_about_untrained_labels(labels: list[str], train_rows: list[Row]) -> list[str]:
    """Labels that only val/test rows carry: they become classes the model never sees a positive for,
    never predicts, and that still cost those rows their accuracy."""
    trained = {r.label for r in train_rows}
    missing = [label for label in labels if label not in trained]
    if missing:
        log.warning("label(s) %s have no training rows (only val/test ones): the model can never predict them; "
                    "move some of their rows to the train split", missing)
    return missing


def _save_checkpoint(path: Path, state: TrainState, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                     epoch: int, metrics: dict[str, float], best: float, identities: dict[str, str],
                     tasks: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "config": cfg.to_dict(),
            "labels": state.data.labels,
            "image_preprocessing": state.built.image_pre.model_dump(mode="json"),
            "max_length": state.built.max_length,
            "state_dict": trainable_state_dict(state.model, identities),
            "frozen_encoders": identities,
            "tasks": tasks,
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "metrics": metrics,
            "best_metric": best,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        },
        tmp,
    )
    tmp.replace(path)  # a crash mid-save never leaves a half-written checkpoint behind


def _check_same_labels(saved: list[str], current: list[str], run_dir: Path) -> None:
    """A checkpoint's classifier has one output per label, in its order: other labels cannot continue it."""
    if saved == current:
        return
    added = [label for label in current if label not in saved]
    removed = [label for label in saved if label not in current]
    what = "; ".join(part for part in (f"new {added}" if added else "", f"gone {removed}" if removed else "")
                     if part) or "the same labels in another order"
    raise CheckpointMismatchError(
        f"the data's labels differ from those {run_dir} was trained on ({what}): a run continues only on "
        "the labels it started with; train a new run (another --run-dir) for these labels")


def train(cfg: TrainConfig, *, progress: bool = True, resume: bool = False) -> Path:
    """Train and return the run folder (holding best.pt, last.pt, results.jsonl, config.json).

    Frozen encoders (``freeze=True``, the default for the pretrained ones) are run once per
    distinct image/text and their outputs cached on disk; the epochs then train only fusion and
    heads on those features.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    cfg = cfg.validate().with_absolute_paths()  # config.json must work from any folder (evaluate/export/verify)
    seed_everything(cfg.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, progress=progress)
    resumed: dict | None = None
    if resume:
        if (run_dir / "last.pt").is_file():
            # Read and checked before any run file is rewritten: the data may have changed since the run began.
            resumed = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
            _check_same_labels(list(resumed["labels"]), data.labels, run_dir)
            done = int(resumed["epoch"]) + 1
            if done >= cfg.epochs:
                log.warning("the run has already trained %d epoch(s) and --epochs is %d: nothing to train; "
                            "raise --epochs to continue", done, cfg.epochs)
        else:
            log.warning("--resume: %s has no last.pt (no epoch finished): starting from the first epoch", run_dir)
    tasks = trained_tasks(cfg, data)
    if "retrieval" not in tasks:
        log.warning("no caption pairs (--captions): the retrieval head is not trained, so the bundle will serve "
                    "classification only; /v1/embed and /v1/search would return untrained projections")
    warn_about_rare_labels(data.split("train"))
    warn_about_untrained_labels(data.labels, data.split("train"))
    tokenizer_file = run_dir / "tokenizer.json"
    train_texts = [r.text for r in data.split("train")] + [r.text for r in data.caption_split("train")]
    built = build_model(cfg, len(data.labels), tokenizer_file, texts=train_texts)
    if built.tokenizer_file != tokenizer_file:
        shutil.copyfile(built.tokenizer_file, tokenizer_file)
    cfg.save(run_dir / "config.json")
    (run_dir / "labels.txt").write_text("\n".join(data.labels) + "\n", encoding="utf-8")
    model = built.model
    identities = frozen_identities(built, cfg)
    state = make_state(built, cfg, data, tokenizer_file, run_dir, identities=identities, progress=progress)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, best, stale = 0, -float("inf"), 0
    results_path = run_dir / "results.jsonl"
    if resumed is not None:
        ckpt = resumed
        load_trainable_state(built, cfg, ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best = int(ckpt["epoch"]) + 1, float(ckpt["best_metric"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
    elif results_path.exists():
        results_path.unlink()

    label_idx = {lab: i for i, lab in enumerate(data.labels)}
    captions = _caption_lookup(data)
    train_rows: list[Row] = data.split("train")
    rng = np.random.default_rng(cfg.seed)
    # Kept in encoder_kwargs until TrainConfig grows an ``lr_schedule`` field.
    schedule = str(cfg.encoder_kwargs.get("lr_schedule", "constant"))
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    lr_factor(schedule, 0, 1)  # refuse an unknown schedule before any work
    for _ in range(start_epoch):  # a resumed run continues the same shuffling sequence
        rng.permutation(len(train_rows))
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        for encoder in (model.image_encoder, model.text_encoder):
            if is_frozen(encoder):
                encoder.eval()  # frozen means deterministic: no BatchNorm statistics updates, no dropout
        t0 = time.perf_counter()
        perm = rng.permutation(len(train_rows))
        total, n = 0.0, 0
        bar = tqdm(range(0, len(perm), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False)
        for step, s in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(schedule, epoch * steps_per_epoch + step, steps_per_epoch * cfg.epochs)
            chunk = [train_rows[i] for i in perm[s : s + cfg.batch_size]]
            idx = torch.tensor([data.image_index[r.image] for r in chunk])
            ip, ir = state.encode_images(idx)
            tp, tt, mask = state.encode_texts([r.text for r in chunk])
            logits = model.classify_features(ip, ir, tp, tt, mask)
            y = torch.tensor([label_idx[r.label] for r in chunk if r.label is not None])
            loss = F.cross_entropy(logits, y)
            if cfg.aux_weight > 0:
                image_logits, text_logits = model.aux_logits(ip, tp)
                loss = loss + cfg.aux_weight * (F.cross_entropy(image_logits, y) + F.cross_entropy(text_logits, y))
            with_caps = [i for i, g in enumerate(idx.tolist()) if g in captions]
            if cfg.contrastive_weight > 0 and len(with_caps) > 1:
                cap_texts = [random.choice(captions[int(idx[i])]) for i in with_caps]
                cp, _, _ = state.encode_texts(cap_texts)
                head = model.contrastive
                loss = loss + cfg.contrastive_weight * info_nce(
                    head.embed_image(ip[with_caps], ir[with_caps]), head.embed_text(cp), head.scale(), idx[with_caps]
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(chunk)
            n += len(chunk)
            bar.set_postfix(loss=f"{total / max(n, 1):.4f}")
        metrics = {"epoch": epoch + 1, "train_loss": total / max(n, 1), "epoch_seconds": time.perf_counter() - t0}
        metrics.update(evaluate_split(state, "val"))
        with results_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics) + "\n")
        score = float(metrics.get(cfg.early_stopping_metric, -metrics["train_loss"]))
        if cfg.early_stopping_metric not in metrics:
            measured = sorted(k for k in metrics if k.startswith("val_") and "median" not in k)
            if measured:  # validation ran but not this metric (a retrieval metric without caption pairs)
                raise ConfigError(f"early_stopping_metric {cfg.early_stopping_metric!r} is not measured on this "
                                  f"data; it has {measured}")
            if epoch == start_epoch:
                log.warning("no validation rows: best.pt is chosen by training loss, not %s",
                            cfg.early_stopping_metric)
        improved = score > best
        if improved:
            best, stale = score, 0
        else:
            stale += 1
        _save_checkpoint(run_dir / "last.pt", state, cfg, optimizer, epoch, metrics, best, identities, tasks)
        # A tie (common for accuracy on a small validation split) also moves best.pt to the later epoch,
        # which has trained longer: with "strictly better" only, a run whose val accuracy stayed at 0.5 shipped
        # its first epoch (text-to-image R@1 0.17 against 0.67 at the third). Early stopping still counts the
        # tie as no improvement.
        if improved or score == best:
            shutil.copyfile(run_dir / "last.pt", run_dir / "best.pt")
        if progress:
            shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val_") and "median" not in k}
            tqdm.write(f"epoch {epoch + 1}: loss {metrics['train_loss']:.4f} {shown}")
        if stale >= cfg.patience:
            if progress:
                tqdm.write(f"early stopping: {cfg.early_stopping_metric} has not improved for {stale} epochs")
            break
    return run_dir


def load_built(run_dir: Path, which: str = "best") -> tuple[BuiltModel, TrainConfig, dict]:
    """Rebuild a trained model from its run folder (config + tokenizer + checkpoint).

    The full model comes back, frozen encoders included (rebuilt from their pretrained weights),
    so export always traces the real encoders, never the feature cache.
    """
    run_dir = Path(run_dir)
    path = run_dir / f"{which}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished training run?")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(ckpt["config"])
    built = build_model(cfg, len(ckpt["labels"]), run_dir / "tokenizer.json")
    load_trainable_state(built, cfg, ckpt)
    built.model.eval()
    return built, cfg, ckpt


def load_run(run_dir: Path, which: str = "best") -> tuple[FusionModel, TrainConfig, dict]:
    built, cfg, ckpt = load_built(run_dir, which)
    return built.model, cfg, ckpt


def evaluate_run(
    run_dir: Path, split: str = "test", which: str = "best", progress: bool = False, use_cache: bool = True
) -> dict[str, float]:
    """Metrics of a checkpoint on one split (``test`` is never used for training or selection).

    Frozen encoders' features come from the feature cache (the same key as in training, so
    mostly hits); ``use_cache=False`` runs every encoder live instead.
    """
    run_dir = Path(run_dir)
    built, cfg, ckpt = load_built(run_dir, which)
    data = prepare_data(cfg, progress=progress)
    trained = list(ckpt["labels"])
    if data.labels != trained:
        # The data's label order is rebuilt from the files; the model's outputs are in the checkpoint's order.
        unknown = sorted(set(data.labels) - set(trained))
        if unknown:
            raise CheckpointMismatchError(
                f"the data now has labels {run_dir} was not trained on ({unknown}): its accuracy on them would be "
                "meaningless; evaluate on the data the run was trained on, or train a new run")
        data.labels = trained
    state = make_state(built, cfg, data, run_dir / "tokenizer.json", run_dir,
                       identities=dict(ckpt.get("frozen_encoders") or {}), use_cache=use_cache, progress=progress)
    return evaluate_split(state, split)
