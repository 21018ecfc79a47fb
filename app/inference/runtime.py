"""ONNX Runtime sessions for a bundle: provider choice, threads, precision, warm-up.

Graph optimisation happens here at load time (ORT_ENABLE_ALL) and is never persisted: fully
optimised graphs are specific to the CPU/GPU they were optimised on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.bundle.manifest import BundleManifest, GraphSpec
from app.core import metrics
from app.core.errors import BundleError

log = logging.getLogger("mmfusion.runtime")

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
MIN_TOP1_AGREEMENT = 0.99


def resolve_providers(requested: str) -> list[str]:
    available = ort.get_available_providers()
    if requested.strip().lower() == "auto":
        wanted = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
        return [*wanted, "CPUExecutionProvider"]
    wanted = [p.strip() for p in requested.split(",") if p.strip()]
    missing = [p for p in wanted if p not in available]
    if missing:
        log.error(
            "requested ONNX Runtime providers %s are not available (available: %s); using CPU", missing, available
        )
    chosen = [p for p in wanted if p in available]
    return chosen if "CPUExecutionProvider" in chosen else [*chosen, "CPUExecutionProvider"]


def choose_precision(manifest: BundleManifest, requested: str, providers: list[str]) -> str:
    """``auto``: the fastest variant whose recorded top-1 agreement with fp32 is >= 0.99."""
    available = manifest.precisions()
    if requested != "auto":
        if requested not in available:
            raise BundleError(f"MMFUSION_PRECISION={requested} but the bundle only has {available}")
        return requested
    on_gpu = "CUDAExecutionProvider" in providers
    preference = ["fp16", "fp32"] if on_gpu else ["int8", "fp32"]
    for precision in preference:
        if precision not in available:
            continue
        if precision == "fp32":
            return "fp32"
        quality = manifest.quality.get(precision)  # type: ignore[call-overload]
        if quality is not None and (quality.top1_agreement or 0.0) >= MIN_TOP1_AGREEMENT:
            return precision
    return "fp32"


@dataclass
class GraphSession:
    role: str
    spec: GraphSpec
    session: ort.InferenceSession
    precision: str

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feed exactly the inputs this graph declares (pruned inputs are simply not fed)."""
        inputs = {name: feeds[name] for name in self.input_names}
        start = time.perf_counter()
        outputs = self.session.run(None, inputs)
        batch = next(iter(inputs.values())).shape[0] if inputs else 0
        metrics.observe_inference(self.role, batch, time.perf_counter() - start)
        return {o.name: v for o, v in zip(self.session.get_outputs(), outputs, strict=True)}


def load_sessions(
    bundle_dir: Path, manifest: BundleManifest, *, providers: list[str], precision: str, intra_op_threads: int
) -> dict[str, GraphSession]:
    sessions: dict[str, GraphSession] = {}
    for role, spec in manifest.graphs.items():
        variant = spec.variants[precision]  # type: ignore[index]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            sess = ort.InferenceSession(str(bundle_dir / variant.file), opts, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors for corrupt graphs
            raise BundleError(f"bundle {bundle_dir}: ONNX Runtime cannot load {variant.file}: {exc}") from None
        declared = {t.name for t in spec.inputs}
        actual = {i.name for i in sess.get_inputs()}
        if not actual <= declared:
            raise BundleError(
                f"bundle {bundle_dir}: {variant.file} has inputs {sorted(actual)} but the manifest "
                f"declares {sorted(declared)}"
            )
        sessions[role] = GraphSession(role, spec, sess, precision)
    return sessions


def dummy_feeds(
    spec: GraphSpec, batch: int = 1, sequence: int = 8, fill: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Zero/one tensors shaped from the manifest: warm-up runs without any real input."""
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = []
        for d in t.shape:
            if isinstance(d, int):
                shape.append(d)
            else:
                shape.append(batch if d == "batch" else (fill or {}).get(d, sequence))
        dtype = _NP_DTYPES[t.dtype]
        feeds[t.name] = np.ones(shape, dtype=dtype) if dtype in (np.int64, np.int32) else np.zeros(shape, dtype=dtype)
    return feeds
