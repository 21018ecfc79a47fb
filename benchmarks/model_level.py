"""Model level: each graph and the whole classify pipeline, PyTorch eager vs ONNX Runtime fp32 vs INT8.

Same inputs for every engine (seeded random pixels, the demo-style questions tokenised by the
bundle's tokenizer, the fusion head fed the fp32 encoders' real outputs), same thread count
(``threads``: ONNX Runtime intra-op threads = ``torch.set_num_threads``), no decoding (that is
the server level's business). Achieved GFLOP/s = FLOPs per item (counted on the eager model with
``torch.utils.flop_counter``, 2 per multiply-add) x items/s, against the fp32 matmul peak measured
in the same run. The text cache is off here: a benchmark of cached lookups would not be a model
benchmark.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.core.config import Settings
from app.inference.pipeline import ModelPipeline
from benchmarks.common import QUESTIONS, Timing

ROLES = ("image_encoder", "text_encoder", "fusion_head")


@dataclass(frozen=True)
class TimingBudget:
    """How long each (target, batch, engine) cell is measured."""

    min_reps: int = 3
    min_seconds: float = 0.3
    max_seconds: float = 3.0


def questions(batch: int) -> list[str]:
    return [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]


def load_pipeline(bundle: Path, precision: str, threads: int) -> ModelPipeline:
    settings = Settings(bundle=bundle, precision=precision, intra_op_threads=threads, text_cache_size=0,
                        index_path=Path(tempfile.gettempdir()) / "mmfusion-bench-unused-index", warmup=False)
    return ModelPipeline(bundle, settings)


def graph_inputs(pipe: ModelPipeline, batch: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Numpy feeds per graph at ``batch``; the fusion head's come from the fp32 encoders themselves."""
    size = pipe.manifest.image.size
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    enc = pipe.tokenizer.encode(questions(batch))
    text_feeds = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    img = pipe.sessions["image_encoder"].run({"pixel_values": pixels})
    txt = pipe.sessions["text_encoder"].run(text_feeds)
    fusion_feeds = {
        "image_features": img["image_features"], "image_regions": img["image_regions"],
        "text_features": txt["text_features"], "text_tokens": txt["text_tokens"],
        "attention_mask": enc.attention_mask,
    }
    return {"image_encoder": {"pixel_values": pixels}, "text_encoder": text_feeds, "fusion_head": fusion_feeds}


def _torch_args(role: str, feeds: dict[str, np.ndarray]) -> tuple[Any, ...]:
    import torch

    order = {
        "image_encoder": ("pixel_values",),
        "text_encoder": ("input_ids", "attention_mask"),
        "fusion_head": ("image_features", "image_regions", "text_features", "text_tokens", "attention_mask"),
    }[role]
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in order)


def count_flops(module: Any, args: tuple[Any, ...]) -> float | None:
    """FLOPs of one eager forward (matmul/conv/attention, 2 per multiply-add); None if uncountable.

    The counter knows matmul, convolution and attention kernels; a module made of others (an
    LSTM, as in the tests' tiny bundle) counts as 0, which is reported as unknown, not as 0.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        module(*args)
    total = float(counter.get_total_flops())
    return total if total > 0 else None


def _sig(x: float, digits: int = 4) -> float:
    """Rounded to significant digits (a tiny test model's GFLOP/s must not round to 0)."""
    return float(f"{x:.{digits}g}")


def _row(target: str, batch: int, engine: str, t: Timing, flops_per_item: float | None,
         peak_gflops: float, note: str = "") -> dict[str, Any]:
    gflops = None if flops_per_item is None else flops_per_item * t.items_per_s / 1e9
    return {
        "target": target, "batch": batch, "engine": engine,
        "median_ms": round(t.median_ms, 3),
        "min_ms": round(min(t.seconds) * 1000, 3),
        "ms_per_item": round(t.median_ms / batch, 3),
        "items_per_s": round(t.items_per_s, 1),
        "gflop_per_item": None if flops_per_item is None else _sig(flops_per_item / 1e9),
        "gflops": None if gflops is None else _sig(gflops),
        "pct_of_peak": None if gflops is None else _sig(100 * gflops / peak_gflops),
        "reps": len(t.seconds),
        "note": note,
    }


def _eager_call(module: Any, args: tuple[Any, ...]) -> Callable[[], object]:
    import torch

    def call() -> None:
        with torch.inference_mode():
            module(*args)

    return call


def _eager_pipeline(model: Any, pipe: ModelPipeline, pixels: np.ndarray, texts: list[str]) -> Callable[[], object]:
    """Eager classify with the same tokenizer: raw texts + pixels -> softmax probabilities."""
    import torch

    def call() -> None:
        enc = pipe.tokenizer.encode(texts)
        with torch.inference_mode():
            logits = model(torch.from_numpy(pixels), torch.from_numpy(enc.input_ids),
                           torch.from_numpy(enc.attention_mask))
            torch.softmax(logits, dim=-1)

    return call


def time_interleaved(fns: dict[str, Callable[[], object]], items: int, budget: TimingBudget,
                     warmups: dict[str, int] | None = None) -> dict[str, Timing]:
    """Time several engines on the same input in rounds (eager, fp32, int8, eager, fp32, ...).

    On a shared machine the background load drifts within seconds; timing one engine after the
    other would charge that drift to whichever ran during a busy spell. Each round gives every
    engine a slice of ``min_seconds / min_reps`` (at least one call), for ``min_reps`` rounds,
    and an engine that has used ``max_seconds`` sits out the remaining rounds.
    """
    for name, fn in fns.items():
        for _ in range((warmups or {}).get(name, 1)):
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    slice_s = budget.min_seconds / max(budget.min_reps, 1)
    for _ in range(max(budget.min_reps, 1)):
        for name, fn in fns.items():
            if seconds[name] and spent[name] >= budget.max_seconds:
                continue
            start = time.perf_counter()
            while True:
                t = time.perf_counter()
                fn()
                dt = time.perf_counter() - t
                seconds[name].append(dt)
                spent[name] += dt
                if time.perf_counter() - start >= slice_s or spent[name] >= budget.max_seconds:
                    break
    return {name: Timing(v, items) for name, v in seconds.items()}


def run_model_level(bundle: Path, eager: Any | None, *, threads: int, batches: tuple[int, ...],
                    eager_batches: tuple[int, ...], peak_gflops: float, budget: TimingBudget,
                    log: Any = print) -> dict[str, Any]:
    """Rows per (target, batch, engine) plus the eager-vs-ORT and INT8-vs-fp32 ratios.

    ``eager`` is a ``benchmarks.eager.EagerModel`` or None (no PyTorch rows). ``eager_batches``
    may be a subset of ``batches``: eager PyTorch at batch 32 takes seconds per call here.
    """
    fp32 = load_pipeline(bundle, "fp32", threads)
    precisions = fp32.manifest.precisions()
    int8 = load_pipeline(bundle, "int8", threads) if "int8" in precisions else None
    variants: dict[str, str] = {}
    for role in ROLES:
        spec = fp32.manifest.graphs[role]
        if "int8" not in spec.variants:
            variants[role] = "no int8 variant"
        elif spec.variants["int8"].file == spec.variants["fp32"].file:
            variants[role] = "int8 = the fp32 file (no faster accurate int8 graph on the machine that built it)"
        else:
            variants[role] = f"quantized graph {spec.variants['int8'].file}"

    torch_graphs: dict[str, Any] = {}
    if eager is not None:
        import torch

        torch.set_num_threads(threads)
        torch_graphs = eager.graphs()

    rows: list[dict[str, Any]] = []
    flops: dict[str, dict[int, float | None]] = {t: {} for t in (*ROLES, "pipeline")}
    image_flops_1: float | None = None
    for batch in batches:
        feeds = graph_inputs(fp32, batch)
        texts = questions(batch)
        # FLOPs per item: counted at this batch on the eager model (image encoder: batch 1 scaled,
        # convolutions are exactly linear in the batch and counting it at 32 costs seconds).
        if torch_graphs:
            if image_flops_1 is None:
                image_flops_1 = count_flops(torch_graphs["image_encoder"],
                                            _torch_args("image_encoder", graph_inputs(fp32, 1)["image_encoder"]))
            flops["image_encoder"][batch] = image_flops_1
            for role in ("text_encoder", "fusion_head"):
                total = count_flops(torch_graphs[role], _torch_args(role, feeds[role]))
                flops[role][batch] = None if total is None else total / batch
            parts = [flops[r][batch] for r in ROLES]
            flops["pipeline"][batch] = None if None in parts else sum(p for p in parts if p is not None)
        notes = {"ort_int8": ""}
        for role in ROLES:
            fns: dict[str, Callable[[], object]] = {}
            warmups: dict[str, int] = {}
            if role in torch_graphs and batch in eager_batches:
                fns["pytorch_eager"] = _eager_call(torch_graphs[role], _torch_args(role, feeds[role]))
                # Past batch 1 the FLOP count above already ran this module at this shape: no
                # extra warm-up call (eager at batch 8+ takes seconds per call on 2 cores).
                warmups["pytorch_eager"] = int(batch == 1 or role == "image_encoder")
            fns["ort_fp32"] = lambda s=fp32.sessions[role], x=feeds[role]: s.run(x)
            if int8 is not None:
                fns["ort_int8"] = lambda s=int8.sessions[role], x=feeds[role]: s.run(x)
            notes["ort_int8"] = variants[role]
            timings = time_interleaved(fns, batch, budget, warmups)
            rows += [_row(role, batch, name, t, flops[role].get(batch), peak_gflops, notes.get(name, ""))
                     for name, t in timings.items()]
        # The whole classify pipeline: pixels + raw texts -> probabilities (tokenising included).
        pixels = feeds["image_encoder"]["pixel_values"]
        fns = {}
        warmups = {}
        if eager is not None and batch in eager_batches:
            fns["pytorch_eager"] = _eager_pipeline(eager.model, fp32, pixels, texts)
            warmups["pytorch_eager"] = int(batch == 1)
        fns["ort_fp32"] = lambda p=pixels, t=texts: fp32.classify(p, t)
        if int8 is not None:
            fns["ort_int8"] = lambda p=pixels, t=texts: int8.classify(p, t)
        notes["ort_int8"] = "int8 variant of every graph that has one"
        rows += [_row("pipeline", batch, name, t, flops["pipeline"].get(batch), peak_gflops, notes.get(name, ""))
                 for name, t in time_interleaved(fns, batch, budget, warmups).items()]
        log(f"  model level: batch {batch} done")

    return {
        "threads": threads,
        "batches": list(batches),
        "eager_batches": list(eager_batches) if eager is not None else [],
        "eager_source": None if eager is None else eager.source,
        "eager_same_weights": None if eager is None else eager.same_weights,
        "int8_variants": variants,
        "default_precision": load_default_precision(bundle, threads),
        "rows": rows,
        "ratios": ratios(rows),
    }


def load_default_precision(bundle: Path, threads: int) -> str:
    """What the server picks with MMFUSION_PRECISION=auto on this machine."""
    from app.bundle.verify import load_bundle_manifest
    from app.inference.runtime import choose_precision, resolve_providers

    return choose_precision(load_bundle_manifest(bundle), "auto", resolve_providers("auto"))


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (target, batch): ORT fp32 speed-up over eager, INT8 speed-up over fp32 (per item).

    From the medians, and (``*_best``) from each engine's fastest call: on a shared machine a load
    spike during some calls moves medians by tens of percent, which hides a real 10% difference;
    the fastest call is the least disturbed estimate of what the engine can do.
    """
    cell = {(r["target"], r["batch"], r["engine"]): r for r in rows}
    out = []
    for target, batch in dict.fromkeys((r["target"], r["batch"]) for r in rows):
        fp = cell.get((target, batch, "ort_fp32"))
        ea = cell.get((target, batch, "pytorch_eager"))
        i8 = cell.get((target, batch, "ort_int8"))
        out.append({
            "target": target, "batch": batch,
            "ort_fp32_vs_eager": None if not (fp and ea) else round(ea["ms_per_item"] / fp["ms_per_item"], 2),
            "int8_vs_fp32": None if not (fp and i8) else round(fp["ms_per_item"] / i8["ms_per_item"], 2),
            "ort_fp32_vs_eager_best": None if not (fp and ea) else round(ea["min_ms"] / fp["min_ms"], 2),
            "int8_vs_fp32_best": None if not (fp and i8) else round(fp["min_ms"] / i8["min_ms"], 2),
            "ort_int8_vs_eager": None if not (i8 and ea) else round(ea["ms_per_item"] / i8["ms_per_item"], 2),
        })
    return out
