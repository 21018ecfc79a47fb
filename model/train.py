"""The training loop: seeded, per-epoch validation, results.jsonl, last/best checkpoints.

Classification (answer the question about the image) and the contrastive caption<->image
objective are trained jointly, so one bundle serves both /v1/classify and /v1/search.
"""

from __future__ import annotations

import json
import random
import shutil
import time
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
from model.fusion_model import FusionModel
from model.heads import info_nce
from model.metrics import classification_metrics, retrieval_metrics


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
    model: FusionModel
    built: BuiltModel
    data: PreparedData
    images: torch.Tensor
    tokenizer: TextTokenizer


def _encode(tok: TextTokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok.encode(texts)
    return torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask)


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
            ids, mask = _encode(state.tokenizer, [r.text for r in chunk])
            probs.append(torch.softmax(model(state.images[idx], ids, mask), -1).numpy())
        y = np.array([label_idx[r.label] for r in rows if r.label is not None])
        metrics.update(classification_metrics(y, np.concatenate(probs), prefix=f"{split}_"))
    caps = data.caption_split(split)
    if caps:
        img_ids = sorted({data.image_index[r.image] for r in caps})
        local = {g: i for i, g in enumerate(img_ids)}
        img_emb = []
        for s in range(0, len(img_ids), batch_size):
            pooled, _ = model.encode_image(state.images[img_ids[s : s + batch_size]])
            img_emb.append(model.contrastive.embed_image(pooled).numpy())
        txt_emb = []
        for s in range(0, len(caps), batch_size):
            ids, mask = _encode(state.tokenizer, [r.text for r in caps[s : s + batch_size]])
            pooled, _ = model.encode_text(ids, mask)
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


def _save_checkpoint(path: Path, state: TrainState, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                     epoch: int, metrics: dict[str, float], best: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "config": cfg.to_dict(),
            "labels": state.data.labels,
            "image_preprocessing": state.built.image_pre.model_dump(mode="json"),
            "max_length": state.built.max_length,
            "state_dict": state.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "metrics": metrics,
            "best_metric": best,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        },
        tmp,
    )
    tmp.replace(path)  # a crash mid-save never leaves a half-written checkpoint behind


def train(cfg: TrainConfig, *, progress: bool = True, resume: bool = False) -> Path:
    """Train and return the run folder (holding best.pt, last.pt, results.jsonl, config.json)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, progress=progress)
    tokenizer_file = run_dir / "tokenizer.json"
    train_texts = [r.text for r in data.split("train")] + [r.text for r in data.caption_split("train")]
    built = build_model(cfg, len(data.labels), tokenizer_file, texts=train_texts)
    if built.tokenizer_file != tokenizer_file:
        shutil.copyfile(built.tokenizer_file, tokenizer_file)
    cfg.save(run_dir / "config.json")
    (run_dir / "labels.txt").write_text("\n".join(data.labels) + "\n", encoding="utf-8")
    model = built.model
    state = TrainState(model, built, data, load_images(data.image_paths, built.image_pre, progress),
                       TextTokenizer(tokenizer_file, built.max_length))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, best, stale = 0, -float("inf"), 0
    results_path = run_dir / "results.jsonl"
    if resume and (run_dir / "last.pt").is_file():
        ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["state_dict"])
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
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = rng.permutation(len(train_rows))
        total, n = 0.0, 0
        bar = tqdm(range(0, len(perm), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False)
        for s in bar:
            chunk = [train_rows[i] for i in perm[s : s + cfg.batch_size]]
            idx = torch.tensor([data.image_index[r.image] for r in chunk])
            ids, mask = _encode(state.tokenizer, [r.text for r in chunk])
            ip, ir = model.encode_image(state.images[idx])
            tp, tt = model.encode_text(ids, mask)
            logits = model.classify_features(ip, ir, tp, tt, mask)
            y = torch.tensor([label_idx[r.label] for r in chunk if r.label is not None])
            loss = F.cross_entropy(logits, y)
            with_caps = [i for i, g in enumerate(idx.tolist()) if g in captions]
            if cfg.contrastive_weight > 0 and len(with_caps) > 1:
                cap_texts = [random.choice(captions[int(idx[i])]) for i in with_caps]
                cids, cmask = _encode(state.tokenizer, cap_texts)
                cp, _ = model.encode_text(cids, cmask)
                head = model.contrastive
                loss = loss + cfg.contrastive_weight * info_nce(
                    head.embed_image(ip[with_caps]), head.embed_text(cp), head.scale(), idx[with_caps]
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
        improved = score > best
        if improved:
            best, stale = score, 0
        else:
            stale += 1
        _save_checkpoint(run_dir / "last.pt", state, cfg, optimizer, epoch, metrics, best)
        if improved:
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
    """Rebuild a trained model from its run folder (config + tokenizer + checkpoint)."""
    run_dir = Path(run_dir)
    path = run_dir / f"{which}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished training run?")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(ckpt["config"])
    built = build_model(cfg, len(ckpt["labels"]), run_dir / "tokenizer.json")
    built.model.load_state_dict(ckpt["state_dict"])
    built.model.eval()
    return built, cfg, ckpt


def load_run(run_dir: Path, which: str = "best") -> tuple[FusionModel, TrainConfig, dict]:
    built, cfg, ckpt = load_built(run_dir, which)
    return built.model, cfg, ckpt


def evaluate_run(run_dir: Path, split: str = "test", which: str = "best", progress: bool = False) -> dict[str, float]:
    """Metrics of a checkpoint on one split (``test`` is never used for training or selection)."""
    built, cfg, _ = load_built(run_dir, which)
    data = prepare_data(cfg, progress=progress)
    images = load_images(data.image_paths, built.image_pre, progress)
    tokenizer = TextTokenizer(Path(run_dir) / "tokenizer.json", built.max_length)
    state = TrainState(built.model, built, data, images, tokenizer)
    return evaluate_split(state, split)
