"""Build a FusionModel from a TrainConfig (used by training, resume and export alike).

``cfg.encoder_kwargs`` holds, besides the per-encoder build arguments under ``"image"`` and
``"text"``:

* ``"contrastive"``: ContrastiveHead options (``hidden_dim``, ``region_queries``, ``pool_dim``,
  ``pool_heads``); ``region_queries > 0`` turns on attention pooling over the image regions.
* ``"feature_cache_dir"``: where frozen encoders' features are cached (read by ``model.train``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from app.bundle.manifest import ImagePreprocessing
from model.config import TrainConfig
from model.encoders import IMAGE_ENCODERS, TEXT_ENCODERS
from model.encoders.base import ImageEncoder
from model.fusion import FUSIONS
from model.fusion_model import FusionModel
from model.heads import ContrastiveHead

CONTRASTIVE_OPTIONS = ("hidden_dim", "region_queries", "pool_dim", "pool_heads")


@dataclass
class BuiltModel:
    model: FusionModel
    image_pre: ImagePreprocessing
    tokenizer_file: Path
    max_length: int
    image_kwargs: dict[str, object]
    text_kwargs: dict[str, object]


@torch.no_grad()
def count_regions(encoder: ImageEncoder, image_size: int) -> int:
    """Regions an encoder yields at ``image_size`` (fixed for a given size; position embeddings need it)."""
    known = getattr(encoder, "num_regions", None)
    if isinstance(known, int):
        return known
    was_training = encoder.training
    encoder.eval()
    try:
        return int(encoder(torch.zeros(1, 3, image_size, image_size))[1].shape[1])
    finally:
        encoder.train(was_training)


def build_contrastive_head(
    cfg: TrainConfig, image_encoder: ImageEncoder, text_dim: int, image_size: int
) -> ContrastiveHead | None:
    """The configured head, or None when the config asks for nothing beyond FusionModel's default."""
    opts = dict(cfg.encoder_kwargs.get("contrastive") or {})
    unknown = sorted(set(opts) - set(CONTRASTIVE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown contrastive options {unknown}; valid: {list(CONTRASTIVE_OPTIONS)}")
    if not opts:
        return None
    queries = int(opts.get("region_queries", 0))
    return ContrastiveHead(
        image_encoder.out_dim,
        text_dim,
        cfg.embed_dim,
        hidden_dim=int(opts["hidden_dim"]) if opts.get("hidden_dim") else None,
        image_regions=count_regions(image_encoder, image_size) if queries else 0,
        pool_dim=int(opts.get("pool_dim", 256)),
        pool_queries=max(queries, 1),
        pool_heads=int(opts.get("pool_heads", 4)),
    )


def build_model(cfg: TrainConfig, num_classes: int, tokenizer_file: Path, texts: list[str] | None = None) -> BuiltModel:
    """``tokenizer_file`` lives in the run folder; text encoders create it there if it is missing."""
    img_kwargs = dict(cfg.encoder_kwargs.get("image", {}))
    if cfg.image_size is not None:
        img_kwargs["image_size"] = cfg.image_size
    image_encoder, ispec = IMAGE_ENCODERS.get(cfg.image_encoder)(**img_kwargs)
    txt_kwargs = dict(cfg.encoder_kwargs.get("text", {}))
    text_encoder, tspec = TEXT_ENCODERS.get(cfg.text_encoder)(
        tokenizer_file=tokenizer_file, max_length=cfg.max_length, texts=texts, **txt_kwargs
    )
    fusion = FUSIONS.get(cfg.fusion)(
        image_dim=image_encoder.out_dim,
        text_dim=text_encoder.out_dim,
        hidden_dim=cfg.hidden_dim,
        num_classes=num_classes,
        num_regions=count_regions(image_encoder, ispec.image_size),
        sequence_stage=cfg.sequence_stage,
        **cfg.fusion_kwargs,
    )
    model = FusionModel(image_encoder, text_encoder, fusion, num_classes, cfg.embed_dim, aux_heads=cfg.aux_weight > 0)
    head = build_contrastive_head(cfg, image_encoder, text_encoder.out_dim, ispec.image_size)
    if head is not None:
        model.contrastive = head
    image_pre = ImagePreprocessing(
        size=ispec.image_size,
        resize_size=ispec.resize_size,
        resize=ispec.resize,  # type: ignore[arg-type]
        mean=ispec.mean,
        std=ispec.std,
    )
    return BuiltModel(
        model, image_pre, Path(tspec.tokenizer_file or tokenizer_file), tspec.max_length, img_kwargs, txt_kwargs
    )
