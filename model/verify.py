"""``mmfusion verify BUNDLE``: re-check a bundle without trusting anything its exporter claimed.

Checks, in order: the manifest and every file's sha256 (exactly as the server does), the ONNX
checker on every variant file, that ONNX Runtime loads every precision and runs the full
pipeline (probabilities sum to one, nothing is NaN), and each non-fp32 variant's top-1 agreement
with fp32 re-measured on real samples, compared with the figure recorded at export. With
``run_dir`` it also re-measures fp32 parity against the PyTorch checkpoint.

Real samples come from ``data`` (a CSV/JSONL manifest), the training run's dataset, or the demo
data ``mmfusion build-default`` leaves next to the bundle; without any, random inputs are used,
and since an agreement on noise is not comparable with one recorded on real samples, only the
embedding cosine to fp32 is then judged (that still catches a swapped or corrupted graph).
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from PIL import Image

from app.bundle.manifest import BundleManifest
from app.bundle.verify import load_bundle_manifest
from app.core.config import Settings
from app.core.errors import MMFusionError
from app.inference.pipeline import ModelPipeline
from app.preprocessing.image import preprocess_pil
from model.data.rows import Row
from model.quantize import Samples, cosine_rows, load_samples

AGREEMENT_MARGIN = 0.01
"""How far a re-measured agreement may fall below the recorded one (thread count and kernel
choice can flip a near-tie or two)."""
MIN_INT8_AGREEMENT = 0.99
"""The bar ``precision=auto`` applies before serving int8; a bundle must not claim it falsely."""
MIN_RANDOM_INPUT_COSINE = 0.9
"""On random inputs: mean embedding cosine to fp32 a faithful variant clears easily and a swapped
or corrupted graph does not (unrelated embeddings are near 0)."""


def demo_data_for(bundle_dir: Path) -> Path | None:
    """The demo Q/A manifest ``mmfusion build-default`` leaves at ``<parent>/.<name>-work/demo``."""
    qa = bundle_dir.parent / f".{bundle_dir.name}-work" / "demo" / "qa.jsonl"
    return qa if qa.is_file() else None


def real_rows(bundle_dir: Path, manifest: BundleManifest, *, data: Path | None, run_dir: Path | None,
              split: str) -> tuple[list[Row], str]:
    """Rows of ``split`` (falling back to val, then all rows) from the first data source found."""
    from model.data.rows import load_rows

    rows: list[Row] = []
    source = ""
    if data is not None and Path(data).is_dir():  # a Flickr8k folder: its matching rows, as training drew them
        from model.data.prepared import flickr8k_task

        rows, source = flickr8k_task(Path(data))[1], str(data)
    elif data is not None:
        rows, source = load_rows(Path(data), labels=list(manifest.labels)), str(data)
    elif run_dir is not None:
        import json

        from model.config import TrainConfig
        from model.data.prepared import prepare_data

        cfg = TrainConfig.from_dict(json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8")))
        rows, source = prepare_data(cfg, progress=False).rows, f"run {run_dir} ({cfg.data})"
    elif (qa := demo_data_for(bundle_dir)) is not None:
        rows, source = load_rows(qa, labels=list(manifest.labels)), str(qa)
    chosen = [r for r in rows if r.split == split] or [r for r in rows if r.split == "val"] or rows
    return chosen, source


def random_image(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth random colour fields plus grain and a few random boxes: an 8-bit RGB picture.

    Not Gaussian tensors: a statically quantized encoder is calibrated on what preprocessing
    produces from real pictures, and values far outside that range are clipped by design, so
    tensor noise would make a faithful INT8 graph look broken.
    """
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = rng.integers(0, size // 2, size=2)
        w, h = rng.integers(size // 8, size // 2, size=2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, size=3)
    img += rng.normal(0, 6, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def random_samples(manifest: BundleManifest, n: int, seed: int) -> Samples:
    """Random pictures through the bundle's own preprocessing, and random questions from common words."""
    rng = np.random.default_rng(seed)
    words = ["what", "color", "is", "the", "circle", "square", "triangle", "red", "blue", "how", "many", "there",
             "a", "large", "small", "shape", "green", "at", "top", "left"]
    texts = [" ".join(rng.choice(words, int(rng.integers(2, 9)))) for _ in range(n)]
    size = max(manifest.image.resize_size, manifest.image.size)
    pixels = np.stack([preprocess_pil(random_image(rng, size), manifest.image) for _ in range(n)])
    return Samples(pixels, np.arange(n), texts, None)


def run_precision(pipe: ModelPipeline, samples: Samples, batch: int = 32) -> dict[str, np.ndarray]:
    """Probabilities per row and embeddings per image/row through the serving pipeline."""
    probs, txt = [], []
    img = np.concatenate([pipe.embed_images(samples.pixel_values[s : s + batch])
                          for s in range(0, len(samples.pixel_values), batch)])
    for s in range(0, len(samples), batch):
        idx = samples.image_index[s : s + batch]
        p, _ = pipe.classify(samples.pixel_values[idx], samples.texts[s : s + batch])
        probs.append(p)
        txt.append(pipe.embed_texts(samples.texts[s : s + batch])[0])
    return {"probabilities": np.concatenate(probs), "image_embedding": img, "text_embedding": np.concatenate(txt)}


def _fail(report: dict[str, Any], message: str) -> None:
    report["ok"] = False
    report["failures"].append(message)


def verify_bundle(
    bundle_dir: Path,
    *,
    run_dir: Path | None = None,
    data: Path | None = None,
    split: str = "test",
    max_samples: int = 2000,
    n_random: int = 32,
    seed: int = 0,
    margin: float = AGREEMENT_MARGIN,
    min_int8_agreement: float = MIN_INT8_AGREEMENT,
) -> dict[str, Any]:
    """Every check, collected into one JSON-able report; ``report["ok"]`` is the verdict."""
    bundle_dir = Path(bundle_dir)
    report: dict[str, Any] = {"bundle": str(bundle_dir), "ok": True, "failures": [], "warnings": [],
                              "graphs": {}, "variants": {}}
    try:
        manifest = load_bundle_manifest(bundle_dir)
    except MMFusionError as exc:
        _fail(report, f"manifest/sha256: {exc}")
        return report
    report.update(name=manifest.name, version=manifest.version, sha256="ok")

    for role, spec in manifest.graphs.items():
        for precision, variant in spec.variants.items():
            key = f"{role}/{precision}"
            try:
                onnx.checker.check_model(str(bundle_dir / variant.file), full_check=True)
                report["graphs"][key] = {"file": variant.file, "onnx_checker": "ok"}
            except Exception as exc:  # the checker raises several unrelated types
                report["graphs"][key] = {"file": variant.file, "onnx_checker": str(exc)}
                _fail(report, f"{key}: onnx.checker: {exc}")

    rows, source = real_rows(bundle_dir, manifest, data=data, run_dir=run_dir, split=split)
    real = bool(rows)
    samples = (load_samples(rows[:max_samples], manifest.image, list(manifest.labels)) if real
               else random_samples(manifest, n_random, seed))
    report["inputs"] = {"kind": "real" if real else "random", "source": source or None, "samples": len(samples),
                        "split": split if real else None}

    outputs: dict[str, dict[str, np.ndarray]] = {}
    for precision in manifest.precisions():
        entry: dict[str, Any] = {}
        report["variants"][precision] = entry
        try:
            pipe = ModelPipeline(bundle_dir, Settings(precision=precision, providers="CPUExecutionProvider"))  # type: ignore[arg-type]
            out = run_precision(pipe, samples)
        except Exception as exc:  # ORT errors are untyped; any of them means the variant cannot serve
            entry["error"] = f"{type(exc).__name__}: {exc}"
            _fail(report, f"{precision}: ONNX Runtime cannot load or run it: {exc}")
            report["traceback"] = traceback.format_exc(limit=3)
            continue
        outputs[precision] = out
        probs = out["probabilities"]
        finite = bool(all(np.isfinite(v).all() for v in out.values()))
        sums = bool(np.allclose(probs.sum(1), 1.0, atol=1e-3))
        entry.update(finite=finite, probabilities_sum_to_1=sums)
        if not finite:
            _fail(report, f"{precision}: outputs contain NaN/inf")
        if not sums:
            _fail(report, f"{precision}: probabilities do not sum to 1")
        if samples.labels is not None:
            entry["accuracy"] = float((probs.argmax(1) == samples.labels).mean())
        if precision == "fp32" or "fp32" not in outputs:
            continue
        ref = outputs["fp32"]
        agreement = float((probs.argmax(1) == ref["probabilities"].argmax(1)).mean())
        img_cos = cosine_rows(ref["image_embedding"], out["image_embedding"])
        txt_cos = cosine_rows(ref["text_embedding"], out["text_embedding"])
        entry.update(
            top1_agreement_vs_fp32=agreement,
            max_abs_prob_diff_vs_fp32=float(np.abs(probs - ref["probabilities"]).max()),
            min_embedding_cosine_vs_fp32=float(min(img_cos.min(), txt_cos.min())),
            mean_embedding_cosine_vs_fp32=float(min(img_cos.mean(), txt_cos.mean())),
        )
        recorded = manifest.quality.get(precision)  # type: ignore[call-overload]
        entry["recorded"] = recorded.model_dump() if recorded is not None else None
        if not real:
            entry["agreement_check"] = "not judged: random inputs are not comparable with the recorded real samples"
            if entry["mean_embedding_cosine_vs_fp32"] < MIN_RANDOM_INPUT_COSINE:
                _fail(report, f"{precision}: mean embedding cosine to fp32 {entry['mean_embedding_cosine_vs_fp32']:.4f}"
                              f" < {MIN_RANDOM_INPUT_COSINE} on random inputs: not a faithful variant of fp32")
            continue
        rec = recorded.top1_agreement if recorded is not None else None
        problems = []
        if rec is None:
            problems.append(f"{precision}: the manifest records no top-1 agreement for this variant")
        elif agreement < rec - margin:
            problems.append(f"{precision}: top-1 agreement with fp32 {agreement:.4f} is below the recorded "
                            f"{rec:.4f} by more than {margin}")
        if precision == "int8" and agreement < min_int8_agreement:
            problems.append(f"int8: top-1 agreement with fp32 {agreement:.4f} < {min_int8_agreement}")
        for problem in problems:
            _fail(report, problem)
        entry["agreement_check"] = "failed" if problems else "ok"

    if run_dir is not None:
        report["pytorch_parity"] = pytorch_parity(bundle_dir, manifest, Path(run_dir), rows[:32])
        if not report["pytorch_parity"]["ok"]:
            _fail(report, f"fp32 does not reproduce the PyTorch checkpoint: {report['pytorch_parity']}")
    report["recorded_parity"] = manifest.parity.model_dump()
    return report


def pytorch_parity(bundle_dir: Path, manifest: BundleManifest, run_dir: Path, rows: list[Row],
                   which: str = "best") -> dict[str, Any]:
    """Re-run the export-time parity check (fresh random + real samples) against the checkpoint."""
    from app.preprocessing.text import TextTokenizer
    from model.export import COSINE_TOLERANCE, PROB_TOLERANCE, measure_parity, parity_inputs
    from model.train import load_run

    model, cfg, _ = load_run(run_dir, which)
    tokenizer = TextTokenizer(bundle_dir / manifest.text.tokenizer_file, manifest.text.max_length)
    inputs, source = parity_inputs(manifest.image, tokenizer, tokenizer._tok.get_vocab_size(),
                                   [(r.image, r.text) for r in rows], seed=cfg.seed + 1)
    parity = measure_parity(model, bundle_dir, manifest.graphs, inputs, source)  # type: ignore[arg-type]
    ok = (parity.max_abs_prob_diff <= PROB_TOLERANCE and parity.min_image_embedding_cosine >= COSINE_TOLERANCE
          and parity.min_text_embedding_cosine >= COSINE_TOLERANCE)
    return {**parity.model_dump(), "ok": bool(ok) and not math.isnan(parity.max_abs_prob_diff)}
