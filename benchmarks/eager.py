"""The PyTorch eager model the benchmark compares ONNX Runtime with (model level and naive server).

It comes from the training run that produced the bundle (``--run``: its ``best.pt`` through
``model.train.load_run``), so eager and ONNX compute the same function with the same weights. A
shipped bundle does not carry its run; without one the model is rebuilt with ``model.build`` from
the bundle manifest's architecture (encoder/fusion names, label count, text length, embedding
size) and the encoders' pretrained weights. The fusion head's weights are then random and its
hidden size is the TrainConfig default, so the speed is comparable (the encoders are >95% of the
FLOPs) but the outputs are not: ``EagerModel.source`` says which case applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from app.bundle.verify import load_bundle_manifest
from model.build import build_model
from model.config import TrainConfig
from model.fusion_model import FusionHeadGraph, FusionModel, ImageEncoderGraph, TextEncoderGraph


@dataclass
class EagerModel:
    model: FusionModel
    source: str
    """'checkpoint <path>' or 'rebuilt from the bundle manifest (random fusion head)'."""
    same_weights: bool

    def graphs(self) -> dict[str, torch.nn.Module]:
        """The three export views, keyed like the bundle's graphs."""
        return {
            "image_encoder": ImageEncoderGraph(self.model).eval(),
            "text_encoder": TextEncoderGraph(self.model).eval(),
            "fusion_head": FusionHeadGraph(self.model).eval(),
        }


def load_eager(bundle_dir: Path, run_dir: Path | None) -> EagerModel:
    """The run's checkpoint when ``run_dir`` has one, else a rebuild from the bundle manifest."""
    if run_dir is not None and (Path(run_dir) / "best.pt").is_file():
        from model.train import load_run

        model, _cfg, _ckpt = load_run(Path(run_dir))
        return EagerModel(model.eval(), f"checkpoint {Path(run_dir) / 'best.pt'}", same_weights=True)
    manifest = load_bundle_manifest(Path(bundle_dir))
    cfg = TrainConfig(
        image_encoder=manifest.model.image_encoder,
        text_encoder=manifest.model.text_encoder,
        fusion=manifest.model.fusion,
        max_length=manifest.text.max_length,
        embed_dim=manifest.embedding_dim,
        encoder_kwargs={"image": {"freeze": True}, "text": {"freeze": True}},
    )
    torch.manual_seed(0)
    built = build_model(cfg, len(manifest.labels), Path(bundle_dir) / manifest.text.tokenizer_file)
    return EagerModel(built.model.eval(), "rebuilt from the bundle manifest (random fusion head)", same_weights=False)
