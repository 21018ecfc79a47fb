"""Build a FusionModel from a TrainConfig (used by training, resume and export alike)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.bundle.manifest import ImagePreprocessing
from model.config import TrainConfig
from model.encoders import IMAGE_ENCODERS, TEXT_ENCODERS
from model.fusion import FUSIONS
from model.fusion_model import FusionModel


@dataclass
class BuiltModel:
    model: FusionModel
    image_pre: ImagePreprocessing
    tokenizer_file: Path
    max_length: int


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
        image_dim=image_encoder.out_dim, text_dim=text_encoder.out_dim, hidden_dim=cfg.hidden_dim
    )
    model = FusionModel(image_encoder, text_encoder, fusion, num_classes, cfg.embed_dim)
    image_pre = ImagePreprocessing(
        size=ispec.image_size,
        resize_size=ispec.resize_size,
        resize=ispec.resize,  # type: ignore[arg-type]
        mean=ispec.mean,
        std=ispec.std,
    )
    return BuiltModel(model, image_pre, Path(tspec.tokenizer_file or tokenizer_file), tspec.max_length)
