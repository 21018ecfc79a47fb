"""The request lifecycle's model part: preprocessed inputs -> encoders -> fusion head.

Each method runs only the graphs its endpoint needs: text-only search never touches the
image encoder. Everything here is synchronous and thread-safe (ONNX Runtime sessions are);
the API layer calls it from worker threads so the event loop never blocks on inference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.bundle.manifest import BundleManifest
from app.bundle.verify import load_bundle_manifest
from app.core.config import Settings
from app.inference.runtime import GraphSession, choose_precision, load_sessions, resolve_providers
from app.preprocessing.text import TextTokenizer

log = logging.getLogger("mmfusion.pipeline")


@dataclass
class TextBatch:
    outputs: dict[str, np.ndarray]
    attention_mask: np.ndarray
    truncated: list[bool]


@dataclass
class Timings:
    """Milliseconds spent per stage, reported back to the client."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, start: float) -> None:
        self.stages[stage] = round(self.stages.get(stage, 0.0) + (time.perf_counter() - start) * 1000, 3)


class ModelPipeline:
    def __init__(self, bundle_dir: Path, settings: Settings):
        self.bundle_dir = Path(bundle_dir)
        self.manifest: BundleManifest = load_bundle_manifest(self.bundle_dir)
        self.providers = resolve_providers(settings.providers)
        self.precision = choose_precision(self.manifest, settings.precision, self.providers)
        self.sessions: dict[str, GraphSession] = load_sessions(
            self.bundle_dir, self.manifest, providers=self.providers, precision=self.precision,
            intra_op_threads=settings.resolved_intra_op_threads(),
        )
        self.tokenizer = TextTokenizer(
            self.bundle_dir / self.manifest.text.tokenizer_file, self.manifest.text.max_length,
            self.manifest.text.pad_id,
        )
        active = sorted({p for s in self.sessions.values() for p in s.session.get_providers()})
        if "CUDAExecutionProvider" in self.providers and "CUDAExecutionProvider" not in active:
            log.error("CUDA was requested but ONNX Runtime fell back to CPU for every graph")
        self.active_providers = active

    # -- encoders -------------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        return self.sessions["image_encoder"].run({"pixel_values": pixel_values})

    def encode_texts(self, texts: list[str]) -> TextBatch:
        enc = self.tokenizer.encode(texts)
        outputs = self.sessions["text_encoder"].run(
            {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
        )
        return TextBatch(outputs, enc.attention_mask, enc.truncated)

    # -- tasks ----------------------------------------------------------------------------
    def classify(self, pixel_values: np.ndarray, texts: list[str], timings: Timings | None = None
                 ) -> tuple[np.ndarray, list[bool]]:
        """[B, 3, H, W] + B texts -> probabilities [B, C] and per-text truncation flags."""
        timings = timings or Timings()
        t = time.perf_counter()
        img = self.encode_images(pixel_values)
        timings.add("image_encoder", t)
        t = time.perf_counter()
        txt = self.encode_texts(texts)
        timings.add("text_encoder", t)
        t = time.perf_counter()
        probs = self.sessions["fusion_head"].run({
            "image_features": img["image_features"], "image_regions": img["image_regions"],
            "text_features": txt.outputs["text_features"], "text_tokens": txt.outputs["text_tokens"],
            "attention_mask": txt.attention_mask,
        })["probabilities"]
        timings.add("fusion_head", t)
        return probs, txt.truncated

    def embed_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.encode_images(pixel_values)["image_embedding"]

    def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        batch = self.encode_texts(texts)
        return batch.outputs["text_embedding"], batch.truncated

    def warmup(self) -> None:
        """One real pass through every graph, so the first client request pays no lazy init."""
        size = self.manifest.image.size
        self.classify(np.zeros((1, 3, size, size), dtype=np.float32), ["warm up"])
