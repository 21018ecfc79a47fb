"""INT8 variants of a bundle's graphs, chosen per graph by measurement on this CPU.

Why per graph and why measured: INT8 is not one thing. On CPUs, dynamic quantization of a CNN
(``ConvInteger``) is a trap (FIELD-NOTES: 6-18x slower than fp32 and features at cosine 0.885),
while static QDQ with calibrated activation ranges is fast, but whether it is faithful depends on
the model *and* the CPU (x86 without VNNI saturates U8S8 products, see ``candidates_for``; and the
default bundle's EfficientNet-Lite0 + attention-pooled embedding stays below the embedding gate even
as exact fake-quant arithmetic, README "INT8"); transformer/LSTM text
encoders are the opposite (dynamic per-channel INT8 is fast and accurate, no calibration data
needed); and a small fusion head may gain nothing from INT8 at all. So each graph gets the
candidates that can work for its kind, every candidate is measured on this CPU (speed at batch 1
and 8, timed alternately with fp32, and the fidelity of the outputs something consumes, against
fp32 on real validation samples), and a graph keeps fp32 when no candidate is both faithful and
faster. Finally every mix of the accepted INT8 graphs is run end to end on the validation split
and the mix that saves the most time while keeping top-1 agreement with fp32 >= ``min_agreement``
wins, so an ``int8`` bundle never promises a variant that changes answers.

Saved graphs are never optimised beyond ONNX Runtime's BASIC level (``quant_pre_process``):
fully optimised graphs are specific to the CPU they were optimised on; the server optimises at
load time instead.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image
from tqdm.auto import tqdm

from app.bundle.manifest import ImagePreprocessing
from app.core.config import container_cpus
from app.inference.cpu_features import EXACT_INT8_DOT, has_exact_int8_dot
from app.inference.runtime import intra_op_split
from app.preprocessing.image import preprocess_pil
from app.preprocessing.text import TextTokenizer
from model.bias_correction import conv_input_means, correct_biases
from model.data.rows import Row
from model.gptq import GPTQ_IMAGES, apply_gptq, conv_input_hessians
from model.mixed_precision import greedy_keep_float, module_scopes, nodes_in

log = logging.getLogger("mmfusion.quantize")

ROLES = ("image_encoder", "text_encoder", "fusion_head")
_USER_VISIBLE = frozenset({"image_embedding", "text_embedding", "probabilities"})
"""Outputs users receive as they are (search/embed/classify); the rest only feed the fusion head."""
_EMBEDDING_OUTPUTS = {"image_encoder": "image_embedding", "text_encoder": "text_embedding"}


@dataclass(frozen=True)
class Int8Options:
    """Knobs of the INT8 search; the defaults are the ones the shipped bundles use."""

    calibration_samples: int = 128
    """Distinct training images (and training rows for the fusion head) that calibrate static ranges."""
    selection_samples: int = 1000
    """Validation rows on which candidates are compared and the end-to-end agreement is enforced (at
    the 0.99 bar, a few hundred rows are needed for one flipped answer not to decide)."""
    evaluation_samples: int = 2000
    """At most this many test rows measure the recorded quality (agreement, accuracy)."""
    min_agreement: float = 0.99
    """End-to-end top-1 agreement with fp32 (validation split) the int8 variant must reach; graphs
    stay fp32 until it does. 0.99 is the bar the server's ``precision=auto`` applies."""
    agreement_margin: float = 1.0
    """Standard errors (of an agreement measured on the validation rows, at ``min_agreement``) that a graph
    and the chosen mix must clear the bar by (:func:`agreement_floor`): 0.9931 for 0.99 on 1,000 rows."""
    min_output_cosine: float = 0.98
    """A candidate whose user-visible output (retrieval embedding, probabilities) has a mean cosine to
    fp32 below this is refused outright: nothing downstream can correct what users receive."""
    min_head_input_cosine: float = 0.95
    """The floor for outputs only the fusion head reads (pooled/token/region features). Their fidelity
    matters only through the head's answers, which ``min_agreement`` measures end to end on real
    validation rows, so this floor only weeds out broken graphs early. Measured on the default bundle
    (AVX2 CPU): dynamic INT8 MiniLM keeps its pooled features at cosine 0.994 but its per-token
    features at 0.975; a 0.98 bar on every consumed output refused it for a number no answer depends on."""
    min_speedup: float = 1.05
    """Geometric mean of the batch-1 and batch-8 fp32/int8 latency ratios a candidate must beat;
    below it (measurement noise included) INT8 buys nothing and the graph stays fp32."""
    require_speedup: bool = True
    """False keeps a faithful candidate even when it is not faster (tests use it to exercise the
    quantized graphs on models too small to gain from INT8)."""
    bench_seconds: float = 0.6
    """Minimum measuring time per (graph, batch size) after warm-up."""
    threads: int = 0
    """Intra-op threads for measuring speed; 0 = what the server gives each graph out of the CPUs this
    process may use (``app.inference.runtime.intra_op_split``: image encoder all, text encoder half,
    fusion head 1). Timing with all cores instead measured the per-row INT8 fusion head slower than a
    batched fp32 one (2 threads: 8 rows 2.4 vs 1.7 ms) where, with the server's 1 thread, it is faster
    (2.7 vs 2.9 ms; batch 1 0.30 vs 0.49 ms)."""

    def threads_for(self, role: str) -> int:
        return self.threads or intra_op_split(role, container_cpus())
    skip: Mapping[str, str] = field(default_factory=dict)
    """Graphs not searched (role -> why): their int8 variant is the fp32 file and the reason is recorded.
    For a graph whose candidates are already known to fail, so a bounded build need not re-measure them."""
    candidates: Mapping[str, tuple[Candidate, ...]] = field(default_factory=dict)
    """Role -> the candidates to measure instead of ``candidates_for``'s (a known-good plan, so a bounded
    build measures one candidate rather than searching). Each is still timed and judged like any other."""
    float_fallback: bool = True
    """When every static candidate of a graph is refused for fidelity alone, search which module blocks to
    leave in float (``model.mixed_precision``: two ranking passes of one quantize run per block plus up to
    ``max_float_scopes`` end-to-end checks; 564 s for EfficientNet-Lite0's 24 blocks on 2 cores)."""
    max_float_scopes: int = 8
    """At most this many module scopes are left in float by that search (beyond it INT8 saves little)."""
    sensitivity_images: int = 32
    """Validation inputs each sensitivity run is judged on (the final candidate is judged on all of them)."""
    float_search_agreement: float = 0.995
    """The pipeline top-1 agreement (validation split, only this graph in INT8) the float search must reach:
    half of ``min_agreement``'s disagreement budget, leaving the rest to the other INT8 graphs and to the
    step from validation to test. Measured on the default bundle: an image encoder found at 0.991 on
    validation agreed 0.989 on test, under the 0.99 that ``precision=auto`` requires."""


@dataclass
class Samples:
    """Real preprocessed samples: distinct images plus (image, text[, label]) rows pointing at them."""

    pixel_values: np.ndarray
    """[I, 3, H, W] float32, preprocessed with the bundle's own image preprocessing."""
    image_index: np.ndarray
    """[N] int: row -> image."""
    texts: list[str]
    labels: np.ndarray | None = None
    """[N] int class ids, or None when the rows are unlabelled."""

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int) -> Samples:
        """The first ``n`` rows and only the images they use."""
        idx = self.image_index[:n]
        used, local = np.unique(idx, return_inverse=True)
        labels = None if self.labels is None else self.labels[:n]
        return Samples(self.pixel_values[used], local.astype(np.int64), self.texts[:n], labels)


@dataclass
class QuantData:
    """Where calibration, candidate selection and the recorded quality figures come from."""

    calibration: Samples
    """Training split: calibrates static activation ranges."""
    selection: Samples
    """Validation split: candidate fidelity and the end-to-end agreement target."""
    evaluation: Samples
    """Test split: the ``quality["int8"]`` figures written into the manifest."""


@dataclass(frozen=True)
class Candidate:
    """One way of quantizing a graph."""

    method: str  # "static_qdq" | "dynamic"
    calibration: str | None = None  # "minmax" | "percentile" (static only)
    activation_type: str = "uint8"  # static only: "uint8" (U8S8) or "int8" (S8S8)
    reduce_range: bool = False
    keep_float: tuple[str, ...] = ()
    """Static only: module scopes (``model.mixed_precision.scope_of``) left unquantized."""
    bias_correction: bool = False
    """Static only: convolution biases corrected for the mean shift of their rounded weights
    (``model.bias_correction``)."""
    gptq: bool = False
    """Static only: convolution weights rounded by GPTQ (``model.gptq``) instead of to nearest."""

    @property
    def batch_variant(self) -> bool:
        """Dynamic quantization takes each activation's scale from the whole batch, so a row's output
        depends on its batch-mates; the server then runs such a graph one row at a time
        (``app.inference.batched``), and its speed must be judged that way."""
        return self.method == "dynamic"

    @property
    def name(self) -> str:
        if self.method == "dynamic":
            return "dynamic_per_channel" + ("_reduce_range" if self.reduce_range else "")
        act = "u8s8" if self.activation_type == "uint8" else "s8s8"
        return (f"static_qdq_per_channel_{self.calibration}_{act}" + ("_reduce_range" if self.reduce_range else "")
                + ("_gptq" if self.gptq else "") + ("_bias_corrected" if self.bias_correction else "")
                + (f"_{len(self.keep_float)}_scopes_float" if self.keep_float else ""))


@dataclass
class CandidateResult:
    """``output_cosine_*`` cover every output; acceptance looks only at the consumed ones."""

    candidate: str
    ms_batch1: float
    ms_batch8: float
    fp32_ms_batch1: float
    """fp32 timed alternately with this candidate (see ``paired_ms``)."""
    fp32_ms_batch8: float
    speedup: float
    """Geometric mean of the fp32/int8 latency ratios at batch 1 and 8 (> 1: INT8 is faster), each as
    the server runs it: a batch-variant candidate serves 8 rows as 8 batch-1 calls."""
    output_cosine_mean: dict[str, float]
    output_cosine_min: dict[str, float]
    top1_agreement: float | None = None
    accepted: bool = False
    reason: str = ""
    batch_variant: bool = False
    """Rows depend on their batch-mates (dynamic quantization): the server runs it one row per call."""
    keep_float: list[str] = field(default_factory=list)
    """Module scopes this candidate leaves in float."""
    full_range_weights: bool = False
    """8-bit weights over their full range (not ``reduce_range``): computed exactly only by CPUs whose
    8-bit products do not saturate (``app.inference.cpu_features``)."""

    @property
    def served_ms_batch8(self) -> float:
        """What 8 rows cost the server with this graph (8 batch-1 calls when batch-variant)."""
        return 8 * self.ms_batch1 if self.batch_variant else self.ms_batch8


@dataclass
class GraphReport:
    role: str
    ops: dict[str, int]
    fp32_ms_batch1: float | None = None
    fp32_ms_batch8: float | None = None
    candidates: list[CandidateResult] = field(default_factory=list)
    chosen: str = "fp32"
    """The candidate name used for this graph's int8 variant, or "fp32" (the fp32 file is reused)."""
    reason: str = ""
    file: str = ""
    int8_ms_batch1: float | None = None
    int8_ms_batch8: float | None = None
    float_search: dict | None = None
    """The mixed-precision search's measurements (``model.mixed_precision.SearchLog``), when it ran."""


@dataclass
class Int8Report:
    graphs: dict[str, GraphReport]
    selection_agreement: float
    top1_agreement: float
    fp32_accuracy: float | None
    accuracy: float | None
    accuracy_drop: float | None
    min_embedding_cosine: float
    samples: int
    reverted: list[str] = field(default_factory=list)
    mix_agreements: dict[str, float] = field(default_factory=dict)
    """Validation top-1 agreement of every mix of accepted INT8 graphs ("+"-joined roles; "" = all fp32)."""
    cpu: str = ""
    cpu_features: list[str] = field(default_factory=list)
    """CPU features the figures depend on (:func:`cpu_features_needed`), recorded in the manifest's quality."""

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A human-readable speed/quality table (the export command prints it)."""
        return format_report(self.to_dict())


def format_report(report: dict) -> str:
    """The table of an ``Int8Report`` in its JSON form (as saved in ``quantization.json``)."""

    def ms(v: float | None) -> str:
        return f"{v:.2f}" if v is not None else "-"

    lines = [
        f"INT8 vs fp32 on {report.get('cpu', '?')} (ONNX Runtime, median ms per call, timed alternately)",
        f"{'graph':<14} {'int8 variant':<44} {'fp32 b1':>8} {'int8 b1':>8} {'fp32 b8':>8} {'int8 b8':>8}",
    ]
    for role, g in report["graphs"].items():
        lines.append(f"{role:<14} {g['chosen']:<44} {ms(g['fp32_ms_batch1']):>8} {ms(g['int8_ms_batch1']):>8} "
                     f"{ms(g['fp32_ms_batch8']):>8} {ms(g['int8_ms_batch8']):>8}")
        if g["chosen"] == "fp32":
            lines.append(f"{'':<14} int8 variant = the fp32 file: {g['reason']}")
        kept = next((c.get("keep_float") for c in g["candidates"] if c["candidate"] == g["chosen"]), None)
        if kept:
            lines.append(f"{'':<14} left in float: {', '.join(kept)}")
    acc = ""
    if report.get("accuracy") is not None and report.get("fp32_accuracy") is not None:
        acc = f", accuracy {report['fp32_accuracy']:.4f} -> {report['accuracy']:.4f}"
    lines.append(
        f"top-1 agreement with fp32: {report['top1_agreement']:.4f} on {report['samples']} test samples "
        f"(validation {report['selection_agreement']:.4f}){acc}; "
        f"min embedding cosine {report['min_embedding_cosine']:.4f}"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Real samples


def spread_rows(rows: list[Row], seed: int = 0) -> list[Row]:
    """Seeded shuffle that puts every image's first row before any image's second row, so the
    first ``n`` rows cover as many distinct images as possible (calibration needs image variety)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    seen: dict[Path, int] = {}
    keyed = []
    for i in order:
        r = rows[int(i)]
        keyed.append((seen.get(r.image, 0), len(keyed), r))
        seen[r.image] = seen.get(r.image, 0) + 1
    return [r for _, _, r in sorted(keyed, key=lambda t: (t[0], t[1]))]


def load_samples(rows: list[Row], image_pre: ImagePreprocessing, labels: list[str] | None) -> Samples:
    """Preprocess the rows' distinct images once (the serving code path) and index rows into them."""
    index: dict[Path, int] = {}
    for r in rows:
        index.setdefault(r.image, len(index))
    pixels = np.empty((len(index), 3, image_pre.size, image_pre.size), dtype=np.float32)
    for path, i in index.items():
        with Image.open(path) as img:
            pixels[i] = preprocess_pil(img, image_pre)
    label_idx = {lab: i for i, lab in enumerate(labels or [])}
    y = None
    if labels is not None and rows and all(r.label in label_idx for r in rows):
        y = np.array([label_idx[r.label] for r in rows], dtype=np.int64)  # type: ignore[index]
    return Samples(pixels, np.array([index[r.image] for r in rows], dtype=np.int64), [r.text for r in rows], y)


# ----------------------------------------------------------------------------------------------
# Running the three graphs


def session(path: Path, threads: int = 0, optimize: bool = True) -> ort.InferenceSession:
    """A CPU session configured as the server configures it (optimised at load time, never saved)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = threads or container_cpus()
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_graph(sess: ort.InferenceSession, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feed exactly the inputs the graph declares (the exporter prunes unused ones)."""
    out = sess.run(None, {i.name: values[i.name] for i in sess.get_inputs()})
    return {o.name: v for o, v in zip(sess.get_outputs(), out, strict=True)}


@dataclass
class PipelineOutputs:
    probabilities: np.ndarray  # [N, C]
    image_embedding: np.ndarray  # [I, E]
    text_embedding: np.ndarray  # [N, E]


class GraphRunner:
    """The encode/classify pipeline over three graph files, batched, for any mix of variants."""

    def __init__(self, paths: dict[str, Path], tokenizer: TextTokenizer, threads: int = 0):
        self.sessions = {role: session(paths[role], threads) for role in ROLES}
        self.tokenizer = tokenizer

    def image_outputs(self, pixel_values: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
        parts = [run_graph(self.sessions["image_encoder"], {"pixel_values": pixel_values[s : s + batch]})
                 for s in range(0, len(pixel_values), batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def run(self, samples: Samples, batch: int = 32) -> PipelineOutputs:
        img = self.image_outputs(samples.pixel_values, batch)
        probs, txt_emb = [], []
        for s in range(0, len(samples), batch):
            enc = self.tokenizer.encode(samples.texts[s : s + batch])
            txt = run_graph(self.sessions["text_encoder"], {"input_ids": enc.input_ids,
                                                            "attention_mask": enc.attention_mask})
            idx = samples.image_index[s : s + batch]
            values = {
                "image_features": img["image_features"][idx],
                "image_regions": img["image_regions"][idx],
                "text_features": txt["text_features"],
                "text_tokens": txt["text_tokens"],
                "attention_mask": enc.attention_mask,
            }
            probs.append(run_graph(self.sessions["fusion_head"], values)["probabilities"])
            txt_emb.append(txt["text_embedding"])
        return PipelineOutputs(np.concatenate(probs), img["image_embedding"], np.concatenate(txt_emb))


def head_feeds(runner: GraphRunner, samples: Samples, batch: int = 16) -> list[dict[str, np.ndarray]]:
    """The fp32 encoders' outputs on real rows: the fusion head's calibration/selection inputs."""
    img = runner.image_outputs(samples.pixel_values)
    feeds = []
    for s in range(0, len(samples), batch):
        enc = runner.tokenizer.encode(samples.texts[s : s + batch])
        txt = run_graph(runner.sessions["text_encoder"], {"input_ids": enc.input_ids,
                                                          "attention_mask": enc.attention_mask})
        idx = samples.image_index[s : s + batch]
        feeds.append({
            "image_features": img["image_features"][idx], "image_regions": img["image_regions"][idx],
            "text_features": txt["text_features"], "text_tokens": txt["text_tokens"],
            "attention_mask": enc.attention_mask,
        })
    return feeds


def graph_feeds(role: str, samples: Samples, tokenizer: TextTokenizer, runner: GraphRunner | None,
                batch: int = 16) -> list[dict[str, np.ndarray]]:
    """Batches of real inputs for one graph."""
    if role == "image_encoder":
        pix = samples.pixel_values
        return [{"pixel_values": pix[s : s + batch]} for s in range(0, len(pix), batch)]
    if role == "text_encoder":
        out = []
        for s in range(0, len(samples), batch):
            enc = tokenizer.encode(samples.texts[s : s + batch])
            out.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
        return out
    assert runner is not None
    return head_feeds(runner, samples, batch)


class FeedReader(CalibrationDataReader):
    """Hands ONNX Runtime's calibrator a list of prepared feeds, keeping only the inputs it declares."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], input_names: list[str]):
        self._feeds = feeds
        self._names = input_names
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._it, None)
        return None if feed is None else {n: feed[n] for n in self._names}

    def rewind(self) -> None:
        self._it = iter(self._feeds)


# ----------------------------------------------------------------------------------------------
# Measuring


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample cosine of two outputs, each sample flattened (regions/tokens included)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na < 1e-12) & (nb < 1e-12)
    cos = (a * b).sum(1) / (na * nb).clip(1e-12)
    return np.where(both_zero, 1.0, cos)


def paired_ms(ref: ort.InferenceSession, cand: ort.InferenceSession, feed: dict[str, np.ndarray],
              seconds: float) -> tuple[float, float]:
    """Median latency of one call of each session, measured alternately (ref, cand, ref, ...).

    Alternating puts both under the same background load at the same moments: on a shared
    machine, timing fp32 first and INT8 a minute later compares two different machines.
    """
    feeds = [{i.name: feed[i.name] for i in s.get_inputs()} for s in (ref, cand)]
    for _ in range(3):
        ref.run(None, feeds[0])
        cand.run(None, feeds[1])
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    while len(times[0]) < 10 or time.perf_counter() - start < 2 * seconds:
        for k, s in enumerate((ref, cand)):
            t = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append((time.perf_counter() - t) * 1000)
        if len(times[0]) >= 2000:
            break
    return float(statistics.median(times[0])), float(statistics.median(times[1]))


def _bench_feeds(feeds: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Batch-1 and batch-8 inputs cut from real feeds (repeating rows if fewer than 8 exist)."""
    first = feeds[0]
    merged = {k: np.concatenate([f[k] for f in feeds]) if all(f[k].shape[1:] == first[k].shape[1:] for f in feeds)
              else first[k] for k in first}
    n = min(len(v) for v in merged.values())
    idx8 = np.arange(8) % n
    return ({k: v[:1] for k, v in merged.items()}, {k: v[idx8] for k, v in merged.items()})


def op_census(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def static_candidates() -> list[Candidate]:
    """Every static QDQ candidate for a convolution graph (see :func:`candidates_for`)."""
    return [
        Candidate("static_qdq", "percentile", "uint8"),
        Candidate("static_qdq", "minmax", "uint8"),
        Candidate("static_qdq", "percentile", "int8"),
        Candidate("static_qdq", "percentile", "uint8", reduce_range=True),
        Candidate("static_qdq", "percentile", "uint8", bias_correction=True),
        Candidate("static_qdq", "percentile", "uint8", reduce_range=True, bias_correction=True),
        Candidate("static_qdq", "percentile", "uint8", gptq=True, bias_correction=True),
        Candidate("static_qdq", "percentile", "uint8", reduce_range=True, gptq=True, bias_correction=True),
    ]


def candidates_for(role: str, ops: dict[str, int], exact_int8_dot: bool | None = None) -> list[Candidate]:
    """What can work for a graph of this kind (the measurement then decides).

    Convolutions: static QDQ only (dynamic ``ConvInteger`` is the measured trap), with 99.999th
    percentile calibration (clips rare outliers) and min/max, U8S8 (what x86 INT8 kernels run) and
    S8S8 (ONNX Runtime's QDQ default). Plus U8S8 with 7-bit weights (``reduce_range``): x86 CPUs
    without VNNI multiply U8S8 with ``vpmaddubsw``, whose 16-bit pair sums saturate with full 8-bit
    weights (measured on an AVX2-only EPYC: feature cosine 0.84 vs 0.98 for the same graph without
    the fused kernels); 7-bit weights cannot saturate but lose precision. And the two U8S8 percentile
    candidates once more with bias correction (``model.bias_correction``; on the default image encoder
    with 7-bit weights: embedding cosine 0.879 -> 0.961), which costs nothing at run time, and once more
    with GPTQ-rounded weights as well (``model.gptq``; 8-bit: answers 0.985 -> 0.990), which costs nothing either.
    Graphs of MatMul/Gemm/LSTM (text encoders): dynamic per-channel, which quantizes activations per
    call from their actual range and needs no calibration (with and without 7-bit weights). The
    small fusion head: dynamic and static.

    On a CPU whose 8-bit products are exact (``app.inference.cpu_features``; ``exact_int8_dot`` overrides
    the detection), static 7-bit weights run the same kernels at the same speed and only lose precision,
    so they are not measured: on the default image encoder the 7-bit GPTQ candidate once won on a timing
    difference that was noise and then agreed with fp32 on 0.986 of the test answers, under the bar.
    """
    has_conv = ops.get("Conv", 0) > 0
    exact = has_exact_int8_dot() if exact_int8_dot is None else exact_int8_dot
    static = [c for c in static_candidates() if not (exact and c.reduce_range)]
    dynamic = [Candidate("dynamic"), Candidate("dynamic", reduce_range=True)]
    if role == "image_encoder":
        return static if has_conv else dynamic
    if role == "text_encoder":
        return static if has_conv and not ops.get("LSTM") else dynamic
    return [*dynamic, Candidate("static_qdq", "minmax", "uint8")]


_FLOAT_OUTPUT_OPS = frozenset({"Softmax"})
"""Ops kept in float by static QDQ where they produce a graph output. ONNX Runtime quantizes a Softmax's
output with a fixed 1/256 scale, so served probabilities come in 1/256 steps and a row sums to about
255/256 (CI served exactly that: classify scores summing to 0.9961). An attention softmax *inside* a graph
stays quantized: on the default image encoder's attention pool, keeping it float changed nothing
(embedding cosine 0.7101 vs 0.7103 with U8S8 kernels, 0.8783 vs 0.8786 with 7-bit weights, 2026-11-29)."""
PROBABILITY_SUM_TOLERANCE = 1e-3
"""How far a candidate's probability rows may sum from 1 before it is refused (fp32 is ~1e-7 off)."""

_CALIBRATION = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
_HAS_CACHE = "calibration_cache_path" in inspect.signature(quantize_static).parameters


def preprocess(src: Path, dst: Path) -> Path:
    """``quant_pre_process``: BASIC optimisation (hardware independent) plus shape inference."""
    try:
        quant_pre_process(str(src), str(dst), skip_optimization=False)
    except Exception as exc:  # symbolic shape inference cannot handle every op; ONNX's own can
        log.info("symbolic shape inference failed on %s (%s); using ONNX shape inference only", src.name, exc)
        quant_pre_process(str(src), str(dst), skip_optimization=False, skip_symbolic_shape=True)
    return dst


def quantize_candidate(pre: Path, out: Path, cand: Candidate, calib: list[dict[str, np.ndarray]],
                       work: Path) -> Path:
    if cand.method == "dynamic":
        quantize_dynamic(str(pre), str(out), per_channel=True, reduce_range=cand.reduce_range,
                         weight_type=QuantType.QInt8)
        return out
    fp32 = onnx.load(str(pre))
    graph = fp32.graph
    names = [i.name for i in graph.input]
    outputs = {o.name for o in graph.output}
    float_outputs = [n for n in graph.node if n.op_type in _FLOAT_OUTPUT_OPS and outputs & set(n.output)]
    if any(not n.name for n in float_outputs):  # nodes_to_exclude matches by name; quant_pre_process names them
        raise ValueError(f"{pre.name}: an unnamed {'/'.join(sorted(_FLOAT_OUTPUT_OPS))} node produces a graph "
                         "output; name it so static QDQ can leave it in float")
    excluded = [n.name for n in float_outputs] + nodes_in(module_scopes(graph), cand.keep_float)
    kwargs: dict = {}
    extra: dict = {}
    if cand.calibration == "percentile":
        extra.update({"CalibPercentile": 99.999, "CalibNumBins": 2048})
    if _HAS_CACHE:
        kwargs["calibration_cache_path"] = work / f"{pre.stem}.{cand.calibration}.calib.json"

    def static(src: Path) -> None:
        quantize_static(
            str(src), str(out), FeedReader(calib, names), quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=cand.reduce_range,
            activation_type=QuantType.QUInt8 if cand.activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=_CALIBRATION[cand.calibration or "minmax"],
            nodes_to_exclude=excluded, extra_options=extra, **kwargs,
        )

    def rounded_by_gptq() -> None:  # same scales, GPTQ's integers (model.gptq)
        if cand.gptq:
            hessians = _cached(work / f"{pre.stem}.conv_hessians.npz",
                               lambda: conv_input_hessians(fp32, _first_rows(calib, GPTQ_IMAGES)))
            onnx.save(apply_gptq(onnx.load(str(out)), fp32, hessians)[0], str(out))

    static(pre)
    rounded_by_gptq()
    if cand.bias_correction:  # same integer weights, biases corrected for their rounding (model.bias_correction)
        means = _cached(work / f"{pre.stem}.conv_input_means.npz", lambda: conv_input_means(fp32, calib))
        corrected, _ = correct_biases(fp32, onnx.load(str(out)), means)
        src = work / f"{pre.stem}.bias_corrected.onnx"
        onnx.save(corrected, str(src))
        static(src)  # the weights are the same floats, so the scales are too: GPTQ's integers are again valid
        rounded_by_gptq()
    return out


def _cached(path: Path, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-export measurements of the fp32 graph (the same for every candidate), kept in the work folder."""
    if path.exists():
        return dict(np.load(path))
    values = compute()
    np.savez(path, **values)
    return values


def _first_rows(feeds: list[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    """The feeds cut to their first ``n`` rows in all."""
    out, taken = [], 0
    for feed in feeds:
        if taken >= n:
            break
        rows = min(n - taken, len(next(iter(feed.values()))))
        out.append({k: v[:rows] for k, v in feed.items()})
        taken += rows
    return out


def served_speedup(fp32_ms1: float, ms1: float, fp32_ms8: float, ms8: float, batch_variant: bool) -> float:
    """Geometric mean of the fp32/int8 latency ratios at batch 1 and 8, as the server runs the graph:
    a batch-variant graph serves 8 rows as 8 batch-1 calls, whatever its batch-8 call costs."""
    served8 = 8 * ms1 if batch_variant else ms8
    return float(np.sqrt((fp32_ms1 / ms1) * (fp32_ms8 / served8)))


def judged_outputs(means: Mapping[str, float], consumed: set[str], options: Int8Options
                   ) -> list[tuple[str, float, float]]:
    """(output, mean cosine, its gate) for the outputs that are judged: user-visible ones against
    ``min_output_cosine``, those only the fusion head reads against ``min_head_input_cosine``; outputs
    nothing reads are not judged."""
    return [(k, v, options.min_output_cosine if k in _USER_VISIBLE else options.min_head_input_cosine)
            for k, v in means.items() if k in _USER_VISIBLE or k in consumed]


def agreement_floor(bar: float, rows: int, standard_errors: float) -> float:
    """The validation agreement to reach so that a choice is not recorded under ``bar`` on the test split
    by sampling noise alone: ``bar + k * sqrt(bar * (1 - bar) / rows)``.

    An agreement measured on n questions is a binomial estimate with standard error sqrt(p(1-p)/n), 0.0031 at
    0.99 on 1,000 questions, i.e. 3 answers. Measured on the default bundle: mixes chosen at 0.990-0.991 on
    validation were recorded at 0.9858, 0.9892 and 0.9908 on the 1,200 test questions, so two of three would
    have shipped an int8 variant that ``precision=auto`` then never serves."""
    if rows <= 0 or bar >= 1.0:
        return bar  # nothing to estimate (a bar above 1 is unreachable on purpose)
    return min(1.0, bar + standard_errors * (bar * (1.0 - bar) / rows) ** 0.5)


def refusal(means: dict[str, float], consumed: set[str], agreement: float | None, speedup: float,
            batch_variant: bool, options: Int8Options, probability_sum_error: float = 0.0,
            floor: float | None = None) -> str:
    """Why a measured candidate is refused ("" = accepted).

    User-visible outputs (embeddings, probabilities) must keep ``min_output_cosine``; outputs only
    the fusion head reads need just ``min_head_input_cosine``, because the end-to-end top-1
    agreement (here for the head itself, and for every mix of graphs afterwards) is what decides
    whether their drift matters. Outputs nothing reads are not judged.
    """
    judged = judged_outputs(means, consumed, options)
    low_visible = [f"{k} {v:.4f}" for k, v, gate in judged if k in _USER_VISIBLE and v < gate]
    low_head = [f"{k} {v:.4f}" for k, v, gate in judged if k not in _USER_VISIBLE and v < gate]
    if probability_sum_error > PROBABILITY_SUM_TOLERANCE:
        return f"probabilities do not sum to 1: off by up to {probability_sum_error:.2g} > {PROBABILITY_SUM_TOLERANCE}"
    if low_visible:
        return "output cosine " + ", ".join(low_visible) + f" < {options.min_output_cosine}"
    if low_head:
        return "fusion-head input cosine " + ", ".join(low_head) + f" < {options.min_head_input_cosine}"
    if not judged:
        return "no consumed output"
    floor = options.min_agreement if floor is None else floor
    if agreement is not None and agreement < floor:
        return f"top-1 agreement {agreement:.4f} < {floor:.4f}"
    if options.require_speedup and speedup < options.min_speedup:
        return (f"not faster: speedup {speedup:.2f}x < {options.min_speedup}x"
                + (" (batch-variant: served one row per call)" if batch_variant else ""))
    return ""


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean()) if len(a) else 1.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{container_cpus()}"
    except OSError:
        pass
    return f"{container_cpus()} CPUs"


def evaluate_graph(role: str, fp32: ort.InferenceSession, cand: ort.InferenceSession,
                   feeds: list[dict[str, np.ndarray]]
                   ) -> tuple[dict[str, float], dict[str, float], float | None, float]:
    """Mean and min cosine to fp32 per output; for the fusion head also top-1 agreement and the largest
    distance of a probability row's sum from 1 (a cosine cannot see a row scaled by 255/256)."""
    cos: dict[str, list[np.ndarray]] = {}
    ref_p, got_p = [], []
    for feed in feeds:
        ref, got = run_graph(fp32, feed), run_graph(cand, feed)
        for name in ref:
            cos.setdefault(name, []).append(cosine_rows(ref[name], got[name]))
        if "probabilities" in ref:
            ref_p.append(ref["probabilities"])
            got_p.append(got["probabilities"])
    means = {k: float(np.concatenate(v).mean()) for k, v in cos.items()}
    mins = {k: float(np.concatenate(v).min()) for k, v in cos.items()}
    agree = _agreement(np.concatenate(ref_p), np.concatenate(got_p)) if ref_p else None
    sum_error = float(np.abs(np.concatenate(got_p).astype(np.float64).sum(1) - 1.0).max()) if got_p else 0.0
    return means, mins, agree, sum_error


_FIDELITY_REFUSALS = ("output cosine", "fusion-head input cosine", "top-1 agreement")


def _first_images(samples: Samples, n: int) -> Samples:
    """The rows about the first ``n`` distinct images (and those images): a cheap, still real, subset."""
    rows = np.flatnonzero(samples.image_index < n)
    return Samples(samples.pixel_values[:n], samples.image_index[rows], [samples.texts[i] for i in rows],
                   None if samples.labels is None else samples.labels[rows])


def gate_margin(means: Mapping[str, float], consumed: set[str], options: Int8Options) -> float:
    """How far the worst judged output's mean cosine is above its gate (>= 0: passes the cosine gates
    ``refusal`` applies)."""
    return min((v - gate for _, v, gate in judged_outputs(means, consumed, options)), default=float("-inf"))


class _GraphSearch:
    """Builds, times and judges INT8 candidates of one graph against its fp32 session."""

    def __init__(self, role: str, fp32_path: Path, ops: dict[str, int], tokenizer: TextTokenizer,
                 fp32_runner: GraphRunner, calib: Samples, select: Samples, consumed: set[str],
                 options: Int8Options, work: Path, say: Callable[..., None], progress: bool = False):
        self.role, self.consumed, self.options, self.work, self.say = role, consumed, options, work, say
        self.tokenizer, self.fp32_runner, self.select = tokenizer, fp32_runner, select
        self.progress = progress
        self._built: tuple[str, tuple[str, ...], ort.InferenceSession] | None = None
        self._reference: tuple[Samples, np.ndarray] | None = None
        self.fp32 = session(fp32_path, options.threads_for(role))  # timed as the server runs it
        self.sel_feeds = graph_feeds(role, select, tokenizer, fp32_runner)
        self.floor = agreement_floor(options.min_agreement, len(select), options.agreement_margin)
        self.b1, self.b8 = _bench_feeds(self.sel_feeds)
        self.pre = preprocess(fp32_path, work / f"{role}.pre.onnx")
        self.cal_feeds = graph_feeds(role, calib, tokenizer, fp32_runner)
        # What this graph is measured with: the plan in ``Int8Options.candidates``, else ``candidates_for``.
        self.candidates = list(options.candidates.get(role) or candidates_for(role, ops))

    def track(self, items: list[str], desc: str) -> Iterable[str]:
        """A progress bar over one ranking pass when progress is shown (a pass takes minutes on a CNN)."""
        return tqdm(items, desc=f"  {self.role} {desc}", unit="block", leave=False) if self.progress else items

    def build(self, cand: Candidate) -> tuple[Path, ort.InferenceSession]:
        out = self.work / f"{self.role}.{cand.name}.onnx"
        quantize_candidate(self.pre, out, cand, self.cal_feeds, self.work)
        sess = session(out, self.options.threads_for(self.role))
        self._built = (cand.name, cand.keep_float, sess)
        return out, sess

    def measure(self, cand: Candidate) -> tuple[CandidateResult, Path | None]:
        """Time (batch 1 and 8, alternately with fp32) and judge one candidate; a candidate that cannot
        be built is a measured "no" (path None)."""
        options = self.options
        t0 = time.perf_counter()
        try:
            out, sess = self.build(cand)
        except Exception as exc:
            nan = float("nan")
            return CandidateResult(cand.name, nan, nan, nan, nan, 0.0, {}, {}, keep_float=list(cand.keep_float),
                                   reason=f"failed: {type(exc).__name__}: {exc}"), None
        qsec = time.perf_counter() - t0
        f1, ms1 = paired_ms(self.fp32, sess, self.b1, options.bench_seconds)
        f8, ms8 = paired_ms(self.fp32, sess, self.b8, options.bench_seconds)
        means, mins, agree, sum_error = evaluate_graph(self.role, self.fp32, sess, self.sel_feeds)
        if agree is None and not refusal(means, self.consumed, None, float("inf"), cand.batch_variant, options,
                                         sum_error):
            # An encoder whose cosines pass is judged by the answers too: measured on the default bundle, a
            # bias-corrected INT8 image encoder at embedding cosine 0.993 alone moved 1.5 % of the answers.
            # Refused here (not only when the mixes are compared), it can still go to the float search.
            agree = self.alone_agreement(sess)
        res = CandidateResult(cand.name, ms1, ms8, f1, f8, served_speedup(f1, ms1, f8, ms8, cand.batch_variant),
                              means, mins, agree, batch_variant=cand.batch_variant, keep_float=list(cand.keep_float),
                              full_range_weights=not cand.reduce_range)
        res.reason = refusal(means, self.consumed, agree, res.speedup, cand.batch_variant, options, sum_error,
                             self.floor)
        if not res.reason:
            res.accepted, res.reason = True, "faithful" + (" and faster" if res.speedup >= options.min_speedup else "")
        worst = min([v for k, v in means.items() if k in self.consumed], default=0.0)
        self.say(f"  {self.role:<13} {cand.name:<44} b1 {f1:7.2f} -> {ms1:7.2f} ms  b8 {f8:7.2f} -> {ms8:7.2f} ms  "
                 f"x{res.speedup:.2f}  cos {worst:.4f}" + (f"  agree {agree:.4f}" if agree is not None else "")
                 + f"  ({qsec:.1f}s) {'ok' if res.accepted else res.reason}")
        return res, out

    def fidelity(self, cand: Candidate, feeds: list[dict[str, np.ndarray]], rows: Samples
                 ) -> tuple[float, float]:
        """(cosine-gate margin on ``feeds``, answer divergence on ``rows``) of a candidate, untimed (the
        sensitivity runs); see ``model.mixed_precision.Fidelity``."""
        try:
            _, sess = self.build(cand)
        except Exception as exc:
            log.info("%s: %s cannot be built (%s)", self.role, cand.name, exc)
            return float("-inf"), float("inf")
        means = evaluate_graph(self.role, self.fp32, sess, feeds)[0]
        return gate_margin(means, self.consumed, self.options), self.answer_divergence(sess, rows)

    def answer_divergence(self, sess: ort.InferenceSession, rows: Samples) -> float:
        """Mean KL divergence of the classifier's probabilities with this graph in INT8 from fp32's: unlike a
        cosine, it sees the few features the answers hinge on (the default bundle's INT8 image encoder kept
        region cosine 0.996 and still flipped 12 answers in 1,000, all about squares, 8 of them right in fp32)."""
        if self._reference is None or self._reference[0] is not rows:
            self._reference = (rows, self.fp32_runner.run(rows).probabilities)
        mixed = copy.copy(self.fp32_runner)
        mixed.sessions = {**self.fp32_runner.sessions, self.role: sess}
        p = self._reference[1].astype(np.float64).clip(1e-12)
        q = mixed.run(rows).probabilities.astype(np.float64).clip(1e-12)
        return float((p * np.log(p / q)).sum(1).mean())

    def alone_agreement(self, sess: ort.InferenceSession) -> float:
        """Top-1 agreement with fp32 of the pipeline with only this graph in INT8 (validation split)."""
        alone = mix_agreements(self.select, self.tokenizer, self.fp32_runner.sessions, {self.role: sess})
        return alone[frozenset({self.role})]

    def passes(self, cand: Candidate) -> tuple[bool, str]:
        """The full fidelity check of the candidate ``fidelity`` just built: every validation input, and
        the top-1 agreement of the pipeline with only this graph in INT8 (``float_search_agreement``)."""
        if self._built is None or self._built[:2] != (cand.name, cand.keep_float):
            _, sess = self.build(cand)
        else:
            sess = self._built[2]
        means, _, agree, sum_error = evaluate_graph(self.role, self.fp32, sess, self.sel_feeds)
        why = refusal(means, self.consumed, agree, float("inf"), cand.batch_variant, self.options, sum_error,
                      self.floor)
        if why:
            return False, why
        agreement = self.alone_agreement(sess)
        bar = self.options.float_search_agreement
        ok = agreement >= bar
        self.say(f"  {self.role:<13} {len(cand.keep_float)} scope(s) in float: pipeline agreement {agreement:.4f}"
                 + ("" if ok else f" < {bar}"))
        return ok, f"pipeline top-1 agreement {agreement:.4f}" + ("" if ok else f" < {bar}")

    def float_fallback(self, tried: list[CandidateResult]
                       ) -> tuple[CandidateResult | None, Path | None, dict | None]:
        """When static candidates were refused for fidelity alone, the one closest to its gates is rerun
        with the module scopes chosen by ``greedy_keep_float`` left in float, then timed and judged in
        full like every candidate (so it still has to be faster)."""
        by_name = {c.name: c for c in self.candidates}
        near = [(gate_margin(r.output_cosine_mean, self.consumed, self.options), by_name[r.candidate]) for r in tried
                if r.candidate in by_name and by_name[r.candidate].method == "static_qdq"
                and r.reason.startswith(_FIDELITY_REFUSALS)]
        if not near:
            return None, None, None
        base = max(near, key=lambda t: t[0])[1]
        scopes = module_scopes(onnx.load(str(self.pre), load_external_data=False).graph)
        feeds = _first_rows(self.sel_feeds, self.options.sensitivity_images)  # each run must stay cheap
        rows = _first_images(self.select, self.options.sensitivity_images)
        self.say(f"  {self.role:<13} every static candidate misses a fidelity gate: ranking {len(scopes)} module "
                 f"scopes by what leaving each in float buys ({base.name})")
        keep, search_log = greedy_keep_float(
            scopes, lambda k: self.fidelity(dataclasses.replace(base, keep_float=k), feeds, rows),
            passes=lambda k: self.passes(dataclasses.replace(base, keep_float=k)),
            start=base.keep_float, max_float=self.options.max_float_scopes, track=self.track)
        report = asdict(search_log) | {"base": base.name, "scopes": len(scopes)}
        self.say(f"  {self.role:<13} float search: {search_log.outcome}"
                 + (f" ({', '.join(keep)})" if keep else ""))
        if keep is None:
            return None, None, report
        res, out = self.measure(dataclasses.replace(base, keep_float=keep))
        return res, out, report


def quantize_graphs(
    graph_dir: Path,
    fp32_files: dict[str, str],
    tokenizer: TextTokenizer,
    data: QuantData,
    options: Int8Options = Int8Options(),
    progress: bool = False,
) -> tuple[dict[str, str], Int8Report]:
    """Write ``<graph>.int8.onnx`` files into ``graph_dir`` and say which file each graph's int8 uses.

    Returns (role -> file name of its int8 variant, the measurements). A graph for which INT8 is not
    worth it maps to its fp32 file.
    """
    graph_dir = Path(graph_dir)
    say = print if progress else (lambda *a, **k: None)
    fp32_paths = {r: graph_dir / fp32_files[r] for r in ROLES}
    fp32_runner = GraphRunner(fp32_paths, tokenizer, options.threads)
    calib = data.calibration.head(max(1, options.calibration_samples))
    select = data.selection.head(max(1, options.selection_samples))
    reports: dict[str, GraphReport] = {}
    chosen_paths: dict[str, Path] = {}
    chosen_results: dict[str, CandidateResult] = {}
    # Fidelity is judged on the outputs something consumes: what the fusion head reads (a concat head
    # never reads token/region features, whose exporter-pruned inputs are absent), the retrieval
    # embeddings, and the probabilities.
    consumed = {i.name for i in fp32_runner.sessions["fusion_head"].get_inputs()} | _USER_VISIBLE
    with tempfile.TemporaryDirectory(prefix="mmfusion-int8-") as tmp:
        work = Path(tmp)
        for role in ROLES:
            ops = op_census(fp32_paths[role])
            if role in options.skip:
                reports[role] = GraphReport(role, ops, reason=f"not searched: {options.skip[role]}")
                say(f"  {role:<13} not searched: {options.skip[role]}")
                continue
            search = _GraphSearch(role, fp32_paths[role], ops, tokenizer, fp32_runner, calib, select, consumed,
                                  options, work, say, progress)
            rep = GraphReport(role, ops)
            best: tuple[CandidateResult, Path] | None = None
            for cand in search.candidates:
                res, out = search.measure(cand)
                rep.candidates.append(res)
                better = best is None or _better(res, best[0], options.require_speedup)
                if out is not None and res.accepted and better:
                    best = (res, out)
            if best is None and options.float_fallback:
                res, out, rep.float_search = search.float_fallback(rep.candidates)
                if res is not None:
                    rep.candidates.append(res)
                    if out is not None and res.accepted:
                        best = (res, out)
            timed = [c for c in rep.candidates if np.isfinite(c.fp32_ms_batch1)]
            if timed:  # the fp32 figures shown: those timed alongside the chosen (else the first) candidate
                shown = best[0] if best is not None else timed[0]
                rep.fp32_ms_batch1, rep.fp32_ms_batch8 = shown.fp32_ms_batch1, shown.fp32_ms_batch8
            if best is None:
                rep.chosen = "fp32"
                rep.reason = "; ".join(f"{c.candidate}: {c.reason}" for c in rep.candidates) or "no candidate"
                if rep.float_search is not None and not any(c.keep_float for c in rep.candidates):
                    rep.reason += f"; float search: {rep.float_search['outcome']}"
            else:
                rep.chosen = best[0].candidate
                rep.reason = best[0].reason
                rep.int8_ms_batch1, rep.int8_ms_batch8 = best[0].ms_batch1, best[0].ms_batch8
                chosen_paths[role] = best[1]
                chosen_results[role] = best[0]
            reports[role] = rep

        # End to end: of all mixes of the accepted INT8 graphs (at most 2^3), keep the one that saves the
        # most time while the pipeline's top-1 agreement with fp32 on the validation rows holds. Time
        # saved per item, at batch 1 (an idle server: latency) plus at batch 8 as served (a loaded one).
        agreements = mix_agreements(select, tokenizer, fp32_runner.sessions,
                                    {r: session(p, options.threads) for r, p in chosen_paths.items()})
        saving = {r: (c.fp32_ms_batch1 - c.ms_batch1) + (c.fp32_ms_batch8 - c.served_ms_batch8) / 8
                  for r, c in chosen_results.items()}
        floor = agreement_floor(options.min_agreement, len(select), options.agreement_margin)
        ok = [m for m, a in agreements.items() if a >= floor] or [frozenset()]
        if options.require_speedup:
            best_mix = max(ok, key=lambda m: (sum(saving[r] for r in m), agreements[m], -len(m)))
        else:  # speed is not the point: keep as many faithful INT8 graphs as the agreement allows
            best_mix = max(ok, key=lambda m: (len(m), agreements[m]))
        active = set(best_mix)
        sel_agree = agreements[best_mix]
        reverted = sorted(set(chosen_paths) - active)
        full = frozenset(chosen_paths)
        for r in reverted:
            reports[r].reason = (f"reverted to fp32: pipeline agreement with all accepted INT8 graphs "
                                 f"{agreements[full]:.4f}, best mix at or above {floor:.4f} without it "
                                 f"{sel_agree:.4f}")
            reports[r].chosen = "fp32"
            reports[r].int8_ms_batch1 = reports[r].int8_ms_batch8 = None

        files: dict[str, str] = {}
        for role in ROLES:
            if role in active:
                name = f"{Path(fp32_files[role]).stem}.int8.onnx"
                shutil.copyfile(chosen_paths[role], graph_dir / name)
                files[role] = name
            else:
                files[role] = fp32_files[role]
            reports[role].file = files[role]

    report = measure_quality(graph_dir, fp32_files, files, tokenizer, data.evaluation.head(options.evaluation_samples),
                             options.threads)
    report.graphs, report.selection_agreement, report.reverted = reports, sel_agree, reverted
    report.mix_agreements = {"+".join(sorted(m)): a for m, a in sorted(agreements.items(), key=lambda kv: len(kv[0]))}
    report.cpu_features = cpu_features_needed([chosen_results[r] for r in sorted(active)])
    return files, report


def cpu_features_needed(served: Iterable[CandidateResult]) -> list[str]:
    """What a CPU must have for the recorded figures of these INT8 graphs to hold on it.

    Full-range 8-bit weights measured on a CPU whose 8-bit products do not saturate (VNNI, AMX,
    non-x86) would compute something else on an x86 CPU without VNNI (README "INT8": feature cosine
    0.84 instead of 0.98 for the same graph), so the variant records that it needs
    :data:`EXACT_INT8_DOT`. Measured on a saturating CPU, the figures already include the saturation and
    hold wherever the products are at least as exact: nothing is required. An unknown CPU counts as
    exact (the requirement is recorded; a serving CPU that lacks it falls back to fp32)."""
    if has_exact_int8_dot() is not False and any(r.full_range_weights for r in served):
        return [EXACT_INT8_DOT]
    return []


def mix_agreements(samples: Samples, tokenizer: TextTokenizer, fp32: dict[str, ort.InferenceSession],
                   int8: dict[str, ort.InferenceSession], batch: int = 32) -> dict[frozenset[str], float]:
    """Pipeline top-1 agreement with fp32 for every subset of ``int8``'s graphs running in INT8.

    Each encoder runs once per precision and the (cheap) head once per mix, so all 2^k mixes cost
    little more than two pipeline passes.
    """
    roles = sorted(int8)
    mixes = [frozenset(r for i, r in enumerate(roles) if bits >> i & 1) for bits in range(1 << len(roles))]

    def image(p: str) -> dict[str, np.ndarray]:
        sess = int8["image_encoder"] if p == "int8" else fp32["image_encoder"]
        parts = [run_graph(sess, {"pixel_values": samples.pixel_values[s : s + batch]})
                 for s in range(0, len(samples.pixel_values), batch)]
        return {k: np.concatenate([x[k] for x in parts]) for k in parts[0]}

    precisions = {r: ["fp32", "int8"] if r in int8 else ["fp32"] for r in ROLES}
    images = {p: image(p) for p in precisions["image_encoder"]}
    probs: dict[frozenset[str], list[np.ndarray]] = {m: [] for m in mixes}
    for s in range(0, len(samples), batch):
        enc = tokenizer.encode(samples.texts[s : s + batch])
        feeds = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
        texts = {p: run_graph(int8["text_encoder"] if p == "int8" else fp32["text_encoder"], feeds)
                 for p in precisions["text_encoder"]}
        idx = samples.image_index[s : s + batch]
        for m in mixes:
            img = images["int8" if "image_encoder" in m else "fp32"]
            txt = texts["int8" if "text_encoder" in m else "fp32"]
            values = {"image_features": img["image_features"][idx], "image_regions": img["image_regions"][idx],
                      "text_features": txt["text_features"], "text_tokens": txt["text_tokens"],
                      "attention_mask": enc.attention_mask}
            head = int8["fusion_head"] if "fusion_head" in m else fp32["fusion_head"]
            probs[m].append(run_graph(head, values)["probabilities"])
    ref = np.concatenate(probs[frozenset()])
    return {m: _agreement(ref, np.concatenate(p)) for m, p in probs.items()}


SPEED_NOISE = 0.15
"""Speedups closer than this share of the larger one are not told apart by :func:`_better`. Measured on a
2-core VM (2026-11-29): two candidates that run the very same integer kernels (8-bit and 7-bit weights on a
VNNI CPU) timed x1.94 vs x1.70 and x1.52 vs x1.64 in two exports, each timed alternately with fp32."""


def _better(a: CandidateResult, b: CandidateResult, by_speed: bool = True) -> bool:
    """Faster wins; within :data:`SPEED_NOISE` of each other, or when speed is not the point, the more
    faithful one (higher worst mean output cosine) wins."""
    if by_speed and abs(a.speedup - b.speedup) > SPEED_NOISE * max(a.speedup, b.speedup):
        return a.speedup > b.speedup
    return min(a.output_cosine_mean.values()) > min(b.output_cosine_mean.values())


def measure_quality(graph_dir: Path, fp32_files: dict[str, str], int8_files: dict[str, str],
                    tokenizer: TextTokenizer, samples: Samples, threads: int = 0) -> Int8Report:
    """Top-1 agreement, accuracy and embedding cosine of the int8 pipeline vs fp32 on real samples."""
    ref = GraphRunner({r: graph_dir / fp32_files[r] for r in ROLES}, tokenizer, threads).run(samples)
    got = GraphRunner({r: graph_dir / int8_files[r] for r in ROLES}, tokenizer, threads).run(samples)
    fp32_acc = acc = drop = None
    if samples.labels is not None:
        fp32_acc = float((ref.probabilities.argmax(1) == samples.labels).mean())
        acc = float((got.probabilities.argmax(1) == samples.labels).mean())
        drop = fp32_acc - acc
    min_cos = float(min(cosine_rows(ref.image_embedding, got.image_embedding).min(),
                        cosine_rows(ref.text_embedding, got.text_embedding).min()))
    return Int8Report(graphs={}, selection_agreement=1.0,
                      top1_agreement=_agreement(ref.probabilities, got.probabilities),
                      fp32_accuracy=fp32_acc, accuracy=acc, accuracy_drop=drop,
                      min_embedding_cosine=float(np.clip(min_cos, -1.0, 1.0)), samples=len(samples), cpu=cpu_name())
