"""The request lifecycle's model part: preprocessed inputs -> encoders -> fusion head.

Each method runs only the graphs its endpoint needs: text-only search never touches the
image encoder. Everything here is synchronous and thread-safe (ONNX Runtime sessions are).
The server does not call these methods per request: ``app.inference.batched.BatchedPipeline``
merges concurrent requests and calls the row-level pieces (:meth:`ModelPipeline.encode_text_rows`,
:meth:`ModelPipeline.fusion_feeds`) on one inference thread per graph. Offline users (index CLI,
verify, evaluate) call the synchronous methods directly; both paths share the same code.

Texts are handled as rows (:class:`TextRow`): each row's outputs trimmed to its own token length,
so rows from different requests can be padded together again (zeros, mask 0) for the fusion head,
and a row can be cached (``app.inference.text_cache``) independently of the batch it came from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app.bundle.manifest import BundleManifest
from app.bundle.verify import load_bundle_manifest
from app.core.config import Settings
from app.core.errors import BundleError
from app.inference.contract import check_declared_shapes, check_same_export, probe_graphs
from app.inference.runtime import (
    GraphSession,
    choose_precision,
    intra_op_split,
    load_graph_session,
    load_sessions,
    resolve_providers,
)
from app.inference.tensorrt import PROVIDER as TENSORRT
from app.inference.tensorrt import TensorRTConfig
from app.inference.text_cache import TextCache
from app.preprocessing.text import TextTokenizer

if TYPE_CHECKING:
    from app.inference.batched import BatchedPipeline

log = logging.getLogger("mmfusion.pipeline")


@dataclass
class TextBatch:
    outputs: dict[str, np.ndarray]
    attention_mask: np.ndarray
    truncated: list[bool]


@dataclass(frozen=True)
class TextRow:
    """One text's encoder outputs: per-text vectors, and token-axis outputs cut to ``length`` tokens."""

    outputs: dict[str, np.ndarray]
    length: int
    truncated: bool


def pad_rows(rows: list[TextRow], name: str, length: int) -> np.ndarray:
    """Stack the token-axis output ``name`` of ``rows`` as [B, length, D], zero-padded."""
    first = rows[0].outputs[name]
    out = np.zeros((len(rows), length, *first.shape[1:]), dtype=first.dtype)
    for i, row in enumerate(rows):
        out[i, : row.length] = row.outputs[name]
    return out


def rows_mask(rows: list[TextRow], length: int) -> np.ndarray:
    """int64 [B, length] attention mask: 1 on each row's own tokens, 0 on padding."""
    lengths = np.array([r.length for r in rows], dtype=np.int64)
    return (np.arange(length, dtype=np.int64)[None, :] < lengths[:, None]).astype(np.int64)


def padded_length(rows: list[TextRow]) -> int:
    """Longest row (at least 1: an empty text still needs one masked position)."""
    return max([1, *(r.length for r in rows)])


@dataclass
class Timings:
    """Milliseconds spent per stage, reported back to the client."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, start: float) -> None:
        self.stages[stage] = round(self.stages.get(stage, 0.0) + (time.perf_counter() - start) * 1000, 3)


class ModelPipeline:
    def __init__(self, bundle_dir: Path, settings: Settings, *, split_threads: bool = False):
        """``split_threads=True`` when the graphs will run concurrently (the server's per-graph
        batchers): the intra-op thread budget is then divided between them (runtime.intra_op_split),
        and the image encoder gets one session per ``MMFUSION_IMAGE_ENCODER_INSTANCES``."""
        self.bundle_dir = Path(bundle_dir)
        self.manifest: BundleManifest = load_bundle_manifest(self.bundle_dir)
        self._load_graphs(settings, split_threads, resolve_providers(settings.providers))
        gpus = [p for p in ("CUDAExecutionProvider", TENSORRT) if p in self.providers]
        if gpus and not any(p in self.active_providers for p in gpus):
            # ONNX Runtime falls back to the CPU without raising (no GPU visible to the container, or CUDA /
            # cuDNN libraries that do not match onnxruntime-gpu). Left alone, a GPU image would serve the
            # precision chosen for CUDA (fp16) on the CPU, slowly, and report itself ready and healthy.
            why = (f"{gpus} requested but ONNX Runtime used none of them (active: {self.active_providers}): no GPU "
                   "visible (docker run --gpus all?) or CUDA/cuDNN libraries that do not match onnxruntime-gpu")
            if settings.providers.strip().lower() != "auto":
                raise BundleError(f"{why}; set MMFUSION_PROVIDERS=auto or CPUExecutionProvider to serve on the CPU")
            log.error("%s; serving on the CPU, with the precision chosen for it", why)
            self._load_graphs(settings, split_threads, ["CPUExecutionProvider"])
        self.tokenizer = TextTokenizer(
            self.bundle_dir / self.manifest.text.tokenizer_file, self.manifest.text.max_length,
            self.manifest.text.pad_id,
        )
        # Refuse a manifest that does not describe its graphs now, not one request at a time.
        check_declared_shapes(self.bundle_dir, self.manifest, self.sessions)
        check_same_export(self.bundle_dir, self.sessions)
        with self.unrecorded():
            probe_graphs(self.bundle_dir, self.manifest, self.sessions, self.tokenizer)
        self.text_cache = TextCache(settings.text_cache_size)
        # The server's batching front, set by the app's lifespan (None for offline users).
        self.batched: BatchedPipeline | None = None
        # Outputs with a token axis ([batch, sequence, D]) are cut per row; the others are per text.
        self._token_outputs = {
            t.name for t in self.manifest.graphs["text_encoder"].outputs if len(t.shape) == 3
        }

    def _load_graphs(self, settings: Settings, split_threads: bool, providers: list[str]) -> None:
        """Choose the precision for ``providers`` and load every session (see ``__init__``)."""
        self.providers = providers
        self.precision = choose_precision(self.manifest, settings.precision, self.providers)
        instances = settings.image_encoder_instances if split_threads else 1
        threads = settings.resolved_intra_op_threads()
        self.sessions: dict[str, GraphSession] = load_sessions(
            self.bundle_dir, self.manifest, providers=self.providers, precision=self.precision,
            intra_op_threads=threads, split_threads=split_threads,
            spinning=settings.intra_op_spinning, tensorrt=self._tensorrt_config(settings),
        )
        # With several image-encoder instances, each also has its own session with its share of the threads
        # (Triton's instance_group: each instance its own copy) for batches that run side by side;
        # sessions["image_encoder"], with every thread, runs a batch that runs alone (app.inference.batched).
        self.image_sessions: list[GraphSession] = [self.sessions["image_encoder"]] if instances == 1 else [
            load_graph_session(self.bundle_dir, "image_encoder", self.manifest.graphs["image_encoder"],
                               providers=self.providers, precision=self.precision,
                               threads=intra_op_split("image_encoder", threads, instances),
                               spinning=settings.intra_op_spinning, tensorrt=self._tensorrt_config(settings))
            for _ in range(instances)
        ]
        self.active_providers = sorted({p for s in self.sessions.values() for p in s.session.get_providers()})

    def _tensorrt_config(self, settings: Settings) -> TensorRTConfig | None:
        if TENSORRT not in self.providers:
            return None
        return TensorRTConfig(
            cache_dir=settings.trt_cache_dir, max_batch=max(settings.max_batch_size, settings.max_client_batch),
            max_tokens=self.manifest.text.max_length, fp16=self.precision == "fp16",
        )

    # -- encoders -------------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray, *, shrink_arena: bool = False, instance: int | None = None
                      ) -> dict[str, np.ndarray]:
        """``instance``: run on that instance's share-of-the-threads session (batches side by side);
        None: on the session with every thread."""
        session = self.sessions["image_encoder"] if instance is None else self.image_sessions[instance]
        return session.run({"pixel_values": pixel_values}, shrink_arena=shrink_arena)

    def encode_text_rows(self, texts: list[str], *, shrink_arena: bool = False) -> list[TextRow]:
        """Tokenise ``texts`` together, answer repeated ones from the cache, run the rest as one batch.

        The misses are run padded to the longest *miss*; each row's token outputs are then cut to
        its own length, so a row is the same (to float rounding, < 1e-5) whatever it was batched with.
        """
        if not texts:
            return []
        enc = self.tokenizer.encode(texts)
        lengths = enc.attention_mask.sum(axis=1).astype(int).tolist()
        rows: list[TextRow | None] = [None] * len(texts)
        keys = [TextCache.key(enc.input_ids[i], n) for i, n in enumerate(lengths)]
        misses: list[int] = []
        first_of: dict[bytes, int] = {}  # the same text twice in one batch is run once
        dupes: list[tuple[int, int]] = []
        for i, key in enumerate(keys):
            if key in first_of:
                dupes.append((i, first_of[key]))
                continue
            first_of[key] = i
            cached = self.text_cache.get(key)
            if cached is not None:
                rows[i] = TextRow(cached, lengths[i], enc.truncated[i])
            else:
                misses.append(i)
        if misses:
            width = max([1, *(lengths[i] for i in misses)])
            outputs = self.sessions["text_encoder"].run({
                "input_ids": np.ascontiguousarray(enc.input_ids[misses, :width]),
                "attention_mask": np.ascontiguousarray(enc.attention_mask[misses, :width]),
            }, shrink_arena=shrink_arena)
            for j, i in enumerate(misses):
                row = {name: (value[j, : lengths[i]] if name in self._token_outputs else value[j])
                       for name, value in outputs.items()}
                rows[i] = TextRow(self.text_cache.put(keys[i], row), lengths[i], enc.truncated[i])
        for i, first in dupes:
            rows[i] = TextRow(rows[first].outputs, lengths[i], enc.truncated[i])  # type: ignore[union-attr]
        return rows  # type: ignore[return-value]

    def encode_texts(self, texts: list[str]) -> TextBatch:
        if not texts:  # an empty batch: the graph's own empty outputs, shapes and dtypes included
            enc = self.tokenizer.encode([])
            outputs = self.sessions["text_encoder"].run({"input_ids": enc.input_ids,
                                                          "attention_mask": enc.attention_mask})
            return TextBatch(outputs, enc.attention_mask, [])
        rows = self.encode_text_rows(texts)
        length = padded_length(rows)
        outputs = {
            name: (pad_rows(rows, name, length) if name in self._token_outputs
                   else np.stack([r.outputs[name] for r in rows]))
            for name in rows[0].outputs
        }
        return TextBatch(outputs, rows_mask(rows, length), [r.truncated for r in rows])

    def fusion_feeds(self, image: dict[str, np.ndarray], rows: list[TextRow]) -> dict[str, np.ndarray]:
        """Fusion-head inputs for image outputs [B, ...] and B text rows, tokens zero-padded (mask 0)."""
        length = padded_length(rows)
        return {
            "image_features": image["image_features"], "image_regions": image["image_regions"],
            "text_features": np.stack([r.outputs["text_features"] for r in rows]),
            "text_tokens": pad_rows(rows, "text_tokens", length),
            "attention_mask": rows_mask(rows, length),
        }

    def fuse(self, feeds: dict[str, np.ndarray], *, shrink_arena: bool = False) -> np.ndarray:
        return self.sessions["fusion_head"].run(feeds, shrink_arena=shrink_arena)["probabilities"]

    # -- tasks ----------------------------------------------------------------------------
    def classify(self, pixel_values: np.ndarray, texts: list[str], timings: Timings | None = None
                 ) -> tuple[np.ndarray, list[bool]]:
        """[B, 3, H, W] + B texts -> probabilities [B, C] and per-text truncation flags."""
        timings = timings or Timings()
        t = time.perf_counter()
        img = self.encode_images(pixel_values)
        timings.add("image_encoder", t)
        t = time.perf_counter()
        rows = self.encode_text_rows(texts)
        timings.add("text_encoder", t)
        t = time.perf_counter()
        probs = self.fuse(self.fusion_feeds(img, rows))
        timings.add("fusion_head", t)
        return probs, [r.truncated for r in rows]

    def embed_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.encode_images(pixel_values)["image_embedding"]

    def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        batch = self.encode_texts(texts)
        return batch.outputs["text_embedding"], batch.truncated

    @contextmanager
    def unrecorded(self) -> Iterator[None]:
        """Graph calls made inside are left out of the inference metrics (start-up passes, not traffic)."""
        sessions = [*self.sessions.values(), *self.image_sessions]
        for s in sessions:
            s.record = False
        try:
            yield
        finally:
            for s in sessions:
                s.record = True

    def warmup(self) -> None:
        """One real pass through every graph, so the first client request pays no lazy init."""
        size = self.manifest.image.size
        with self.unrecorded():
            self.classify(np.zeros((1, 3, size, size), dtype=np.float32), ["warm up"])
            if self.image_sessions != [self.sessions["image_encoder"]]:
                for instance in range(len(self.image_sessions)):
                    self.encode_images(np.zeros((1, 3, size, size), dtype=np.float32), instance=instance)
