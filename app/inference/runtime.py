"""ONNX Runtime sessions for a bundle: provider choice, threads, precision, warm-up.

Every setting below was chosen by a measurement (default bundle: EfficientNet-Lite0 224 + MiniLM
+ cross-attention head, this 2-core machine, median ms per ``run``; see :data:`SPINNING` etc.):

* Graph optimisation at load time, ``ORT_ENABLE_ALL``, in memory only (``optimized_model_filepath``
  is never set): fully optimised graphs are specific to the CPU/GPU they were optimised on, and
  ONNX Runtime itself warns when one is saved.
* Threads: in the server one inference thread per session calls ``run`` (app.inference.batcher),
  so up to three sessions run at once; ``intra_op_threads`` (default: the container's CPUs) is then
  split between them by :func:`intra_op_split` (offline users, one graph at a time, give each
  session the whole budget), and ``inter_op_num_threads = 1`` (the graphs are sequential chains).
* Spinning off, arena off: see :data:`SPINNING` and :data:`CPU_ARENA`.
* CUDA: ``cudnn_conv_algo_search = HEURISTIC`` (EXHAUSTIVE benchmarks every conv algorithm for
  every new input shape: seconds of stall on the first request of each batch size, a cold-start
  trap with dynamic batching) and ``do_copy_in_default_stream = 1`` (host<->device copies ordered
  with the compute stream: no extra synchronisation). IO binding is not used: the batcher feeds
  numpy arrays that come from the CPU (decode, tokenizer) and goes back to the CPU (JSON), so
  binding would save one allocation per call at most; unmeasured here (no GPU), so not added.
* TensorRT: opt-in through ``MMFUSION_PROVIDERS``, with one optimisation profile per graph and
  engine/timing caches (``app.inference.tensorrt``); CUDA is put right after it for the nodes
  TensorRT refuses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.bundle.manifest import BundleManifest, GraphSpec, VariantQuality
from app.core import metrics
from app.core.errors import BundleError
from app.inference.cpu_features import missing_features
from app.inference.tensorrt import PROVIDER as TENSORRT
from app.inference.tensorrt import TensorRTConfig, prepare_cache_dir, tensorrt_options

log = logging.getLogger("mmfusion.runtime")

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
MIN_TOP1_AGREEMENT = 0.99

SPINNING = False
"""``session.intra_op.allow_spinning`` by default (``MMFUSION_INTRA_OP_SPINNING`` overrides).

Alone, spinning helps: one image-encoder call at batch 1 took 7.3 ms spinning against 10.2 ms not
(2 threads, 2026-11-29; an earlier measurement on a busier machine saw no difference). The server
runs graphs concurrently, though. With 2 intra-op threads each and both encoders running at once
as in a classify, spinning gave 25.3 ms per image-encoder call and 16.0 ms per text-encoder call,
against 11.4 and 6.6 ms off. With spinning for the image encoder only, at 4 and 16 closed-loop
clients, it gave 62-69 and 70-76 req/s against 73 and 80-90 off (two alternating runs each).
Spinning workers burn the cores that the other sessions and the decode pool need."""

CPU_ARENA = True
"""``enable_cpu_mem_arena``. Measured on the image encoder (2 threads) over mixed batch sizes 1/8/3/5:
9.8 ms per item with the arena, 12.6 without (fresh buffers page-fault on every call). But the
arena keeps its peak: resident memory 101 MiB after warm-up, 363-434 MiB after one batch-32 call,
and it stays there. So the arena stays on and is shrunk (:data:`SHRINK_RUN_OPTIONS`: back to 104 MiB
in the same measurement) by a 1-row run once, after a batch larger than :data:`SHRINK_AFTER_ROWS`, the
graph has gone ``BatchingConfig.idle_s`` with an empty queue or with only small batches
(app.inference.batched): never during sustained heavy load, and memory returns once a burst is over,
with glibc's freed heap pages (app.core.memory)."""

SHRINK_AFTER_ROWS = 8
"""Batches up to this many rows leave the arena alone (image encoder: ~50 MiB of buffers at 8)."""


def _shrink_options() -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


SHRINK_RUN_OPTIONS = _shrink_options()

CUDA_OPTIONS: dict[str, str] = {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}


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
    if TENSORRT in chosen and "CUDAExecutionProvider" in available and "CUDAExecutionProvider" not in chosen:
        # TensorRT refuses some nodes (e.g. dynamic INT8's DynamicQuantizeLinear); without CUDA next in line,
        # ONNX Runtime would run those on the CPU and copy tensors back and forth.
        chosen.insert(chosen.index(TENSORRT) + 1, "CUDAExecutionProvider")
    return chosen if "CPUExecutionProvider" in chosen else [*chosen, "CPUExecutionProvider"]


def auto_serves(quality: VariantQuality | None) -> bool:
    """Whether ``auto`` may serve a non-fp32 variant with this recorded quality: top-1 agreement with fp32
    >= :data:`MIN_TOP1_AGREEMENT` (export warns with the same rule, ``model.export.auto_precision_note``)."""
    return quality is not None and (quality.top1_agreement or 0.0) >= MIN_TOP1_AGREEMENT


def choose_precision(manifest: BundleManifest, requested: str, providers: list[str]) -> str:
    """``auto``: the fastest variant whose recorded top-1 agreement with fp32 is >= 0.99 and whose
    recorded figures hold on this CPU (``VariantQuality.cpu_features``). An explicit precision is served
    as asked, with a warning when this CPU lacks what its figures were measured with."""
    available = manifest.precisions()
    if requested != "auto":
        if requested not in available:
            raise BundleError(f"MMFUSION_PRECISION={requested} but the bundle only has {available}")
        quality = manifest.quality.get(requested)  # type: ignore[call-overload]
        missing = missing_features(quality.cpu_features) if quality else []
        if missing:
            log.warning("MMFUSION_PRECISION=%s: this CPU lacks %s, which the variant's recorded agreement was "
                        "measured with; its answers may differ from fp32 more than recorded", requested, missing)
        return requested
    on_gpu = "CUDAExecutionProvider" in providers or TENSORRT in providers
    preference = ["fp16", "fp32"] if on_gpu else ["int8", "fp32"]
    for precision in preference:
        if precision not in available:
            continue
        if precision == "fp32":
            return "fp32"
        quality: VariantQuality | None = manifest.quality.get(precision)  # type: ignore[call-overload]
        if not auto_serves(quality):
            continue
        missing = missing_features(quality.cpu_features)  # type: ignore[union-attr]
        if missing:
            log.warning("MMFUSION_PRECISION=auto: not serving %s, whose recorded agreement was measured on a CPU "
                        "with %s, which this one lacks (x86 without VNNI saturates 8-bit products); set "
                        "MMFUSION_PRECISION=%s to serve it anyway", precision, missing, precision)
            continue
        return precision
    return "fp32"


@dataclass
class GraphSession:
    role: str
    spec: GraphSpec
    session: ort.InferenceSession
    precision: str
    record: bool = True
    """Count calls in the inference metrics; off for start-up passes (probe, warm-up), which are not traffic."""

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def file(self) -> str:
        """The bundle file this session runs (the served precision's variant)."""
        return self.spec.variants[self.precision].file  # type: ignore[index]

    def run(self, feeds: dict[str, np.ndarray], *, shrink_arena: bool = False, record: bool = True
            ) -> dict[str, np.ndarray]:
        """Feed exactly the inputs this graph declares (pruned inputs are simply not fed).

        ``shrink_arena``: give the CPU arena's unused memory back after this call (see :data:`CPU_ARENA`).
        """
        inputs = {name: feeds[name] for name in self.input_names}
        start = time.perf_counter()
        outputs = self.session.run(None, inputs, SHRINK_RUN_OPTIONS if shrink_arena else None)
        if self.record and record:
            batch = next(iter(inputs.values())).shape[0] if inputs else 0
            metrics.observe_inference(self.role, batch, time.perf_counter() - start)
        return {o.name: v for o, v in zip(self.session.get_outputs(), outputs, strict=True)}


def intra_op_split(role: str, budget: int, image_instances: int = 1) -> int:
    """Intra-op threads of one graph's session, out of ``budget`` (the CPUs the container may use).

    A classify runs the image and text encoders at the same time (two inference threads), then the
    fusion head. Measured on the default bundle (2 cores, ms per call at 1 / 2 intra-op threads, each
    graph alone): image encoder 13.0 / 15.0 at batch 1, 119 / 72 at batch 8; text encoder 7.8 / 8.1
    at batch 1, 36.5 / 22.8 at batch 8; fusion head 0.35 / 0.66 at batch 1, 3.7 / 3.4 at batch 16.

    * image encoder: most of the work, and it needs every core once batches form -> ``budget``;
    * text encoder: it runs beside the image encoder, so it gets half -> ``max(1, budget // 2)``;
    * fusion head: too small to gain from threads -> 1.

    End to end (in-process classify through the batchers, pre-decoded demo images, fp32 encoders,
    int8 fusion head, text cache off): this split gave 62.3 req/s at p50 15.7 ms for 1 client and
    70.7 req/s for 16 clients; every session at 2 threads gave 52.4 req/s at p50 19.3 ms and 60.0 req/s.

    With ``image_instances`` inference threads on the image encoder, each also has its own session (as
    Triton's instance_group gives each instance its own model copy) with ``budget // image_instances``
    threads, for batches that run side by side; a batch that runs alone uses the ``budget`` session
    (app.inference.batched). Two 2-thread sessions side by side, or one shared, ran four threads on two
    cores (worse p99); an all-threads instance beside a 1-thread one still ran three (no gain).
    """
    if role == "fusion_head":
        return 1
    if role == "text_encoder":
        return max(1, budget // 2)
    return max(1, budget // max(1, image_instances))


def session_options(intra_op_threads: int, spinning: bool = SPINNING) -> ort.SessionOptions:
    """The measured CPU settings (module docstring); optimised graphs stay in memory."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = CPU_ARENA
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def provider_options(
    providers: list[str], spec: GraphSpec | None = None, trt: TensorRTConfig | None = None
) -> list[str | tuple[str, dict[str, str]]]:
    """Providers with their options: CUDA gets :data:`CUDA_OPTIONS`, TensorRT the profiles and caches of
    ``app.inference.tensorrt`` for this graph (``spec`` and ``trt`` are then required), others their defaults."""
    out: list[str | tuple[str, dict[str, str]]] = []
    for p in providers:
        if p == "CUDAExecutionProvider":
            out.append((p, dict(CUDA_OPTIONS)))
        elif p == TENSORRT:
            if spec is None or trt is None:
                raise ValueError("TensorRT needs the graph's spec and a TensorRTConfig (profile shapes, engine cache)")
            out.append((p, tensorrt_options(spec, trt)))
        else:
            out.append(p)
    return out


def load_sessions(
    bundle_dir: Path, manifest: BundleManifest, *, providers: list[str], precision: str, intra_op_threads: int,
    split_threads: bool = False, spinning: bool = SPINNING, tensorrt: TensorRTConfig | None = None,
) -> dict[str, GraphSession]:
    """``split_threads``: the graphs will run concurrently (the server's batchers): divide the
    thread budget with :func:`intra_op_split`. Otherwise (offline, one graph at a time) each
    session gets the whole budget. ``tensorrt``: required when ``providers`` has TensorRT."""
    if TENSORRT in providers:
        if tensorrt is None:
            raise ValueError("the TensorRT provider needs a TensorRTConfig")
        prepare_cache_dir(tensorrt)
    sessions: dict[str, GraphSession] = {}
    for role, spec in manifest.graphs.items():
        sessions[role] = load_graph_session(
            bundle_dir, role, spec, providers=providers, precision=precision, tensorrt=tensorrt, spinning=spinning,
            threads=intra_op_split(role, intra_op_threads) if split_threads else intra_op_threads)
    return sessions


def load_graph_session(bundle_dir: Path, role: str, spec: GraphSpec, *, providers: list[str], precision: str,
                       threads: int, spinning: bool = SPINNING, tensorrt: TensorRTConfig | None = None
                       ) -> GraphSession:
    """One graph's session, checked against the manifest's declared inputs."""
    variant = spec.variants[precision]  # type: ignore[index]
    opts = session_options(threads, spinning)
    try:
        sess = ort.InferenceSession(
            str(bundle_dir / variant.file), opts, providers=provider_options(providers, spec, tensorrt)
        )
    except Exception as exc:  # ORT raises its own untyped errors for corrupt graphs
        raise BundleError(f"bundle {bundle_dir}: ONNX Runtime cannot load {variant.file}: {exc}") from None
    declared = {t.name for t in spec.inputs}
    actual = {i.name for i in sess.get_inputs()}
    if not actual <= declared:
        raise BundleError(
            f"bundle {bundle_dir}: {variant.file} has inputs {sorted(actual)} but the manifest "
            f"declares {sorted(declared)}"
        )
    return GraphSession(role, spec, sess, precision)


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


def batch_invariant(session: GraphSession, atol: float = 1e-5) -> bool:
    """Does a row's output depend on the other rows of its batch? Probed, not guessed.

    Dynamically quantised INT8 graphs (``DynamicQuantizeLinear``) compute one activation scale per
    tensor over the whole batch, so merging requests changes each one's result at quantisation-noise
    level: measured on the default bundle's INT8 fusion head, up to 1.0e-4 in a probability (fp32:
    6e-10). Two random rows of very different scale, run together and alone, expose that.
    """
    rng = np.random.default_rng(0)
    feeds = dummy_feeds(session.spec, batch=2, sequence=8)
    for name, value in feeds.items():
        if value.dtype.kind == "f":
            noise = rng.standard_normal(value.shape).astype(value.dtype)
            noise[1] *= 8.0
            feeds[name] = noise
    together = session.session.run(None, {n: feeds[n] for n in session.input_names})
    for row in range(2):
        alone = session.session.run(None, {n: feeds[n][row:row + 1] for n in session.input_names})
        for a, t in zip(alone, together, strict=True):
            if not np.allclose(a[0], t[row], atol=atol, rtol=0):
                return False
    return True
