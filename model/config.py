"""Training configuration: one dataclass, loadable from JSON and overridable from the CLI."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.errors import ConfigError
from model.metrics import SELECTABLE_METRICS


@dataclass
class TrainConfig:
    """Every knob of a training run. The resolved config is written into the run folder."""

    data: str = "demo"
    """'demo' (built-in generator), a CSV/JSONL manifest (image,text,label[,split]), or a Flickr8k folder."""
    captions: str | None = None
    """Optional CSV/JSONL of (image, text[, split]) caption pairs for the contrastive head."""
    run_dir: str = "runs/default"
    name: str = "mmfusion-demo"
    version: str = "0.1.0"
    image_encoder: str = "small_cnn"
    text_encoder: str = "bilstm"
    fusion: str = "concat"
    """A name in model.fusion.FUSIONS: concat | weighted_sum | gmu | cross_attention | late."""
    sequence_stage: str = "none"
    """none | bilstm | transformer: a sequence model inside the fusion (what it runs over depends
    on the strategy; see model/fusion/sequence.py)."""
    fusion_kwargs: dict[str, Any] = field(default_factory=dict)
    """Strategy-specific builder arguments, e.g. {"num_heads": 4, "num_layers": 2, "dropout": 0.1}."""
    aux_weight: float = 0.0
    """Weight of the auxiliary per-modality losses CE(image head) + CE(text head); 0 = no aux heads."""
    image_size: int | None = None
    """Override the encoder's native input size (the small CNN defaults to 64)."""
    max_length: int = 32
    hidden_dim: int = 256
    embed_dim: int = 128
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    contrastive_weight: float = 0.5
    seed: int = 0
    demo_images: int = 600
    demo_dir: str = "data/demo"
    demo_image_size: int = 224
    early_stopping_metric: str = "val_accuracy"
    patience: int = 5
    num_threads: int = 0
    """Torch intra-op threads (0 = all available CPUs)."""
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        """Refuse values that cannot work before any data is generated or any epoch runs: a misspelled
        metric used to select checkpoints silently by training loss, and ``epochs=0`` "trained" nothing.

        Called for a run about to train (``train``), not when a finished run's config is read back:
        a run trained before these checks must still export, evaluate and verify."""
        for name in ("epochs", "batch_size", "patience", "hidden_dim", "embed_dim", "demo_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 tokens, got {self.max_length}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        allowed = [f"val_{m}" for m in SELECTABLE_METRICS]
        if self.early_stopping_metric not in allowed:
            raise ConfigError(f"early_stopping_metric {self.early_stopping_metric!r} is not a validation metric "
                              f"where higher is better; choose one of {allowed}")
        return self

    def with_absolute_paths(self) -> TrainConfig:
        """The data paths made absolute: the run's config.json is read again by evaluate, export and
        verify, often from another folder, where a relative path would name nothing."""

        def absolute(p: str) -> str:
            return str(Path(p).expanduser().resolve())

        return dataclasses.replace(
            self, data=self.data if self.data == "demo" else absolute(self.data),
            captions=None if self.captions is None else absolute(self.captions), demo_dir=absolute(self.demo_dir),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
