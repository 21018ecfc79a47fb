"""``mmfusion verify BUNDLE``: re-check a bundle without its training run.

Checks the manifest and every sha256 (as the server does), runs ``onnx.checker`` on every
graph file, loads each into ONNX Runtime, runs the full pipeline, and re-measures each
precision variant's agreement with fp32 on the same inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from app.bundle.verify import load_bundle_manifest
from app.core.config import Settings
from app.inference.pipeline import ModelPipeline


def verify_bundle(bundle_dir: Path, n: int = 16, seed: int = 0) -> dict:
    manifest = load_bundle_manifest(bundle_dir)
    report: dict = {"bundle": str(bundle_dir), "name": manifest.name, "version": manifest.version,
                    "sha256": "ok", "graphs": {}, "variants": {}, "ok": True}
    for role, spec in manifest.graphs.items():
        for precision, variant in spec.variants.items():
            onnx.checker.check_model(str(Path(bundle_dir) / variant.file), full_check=True)
            report["graphs"][f"{role}/{precision}"] = "onnx.checker ok"
    rng = np.random.default_rng(seed)
    size = manifest.image.size
    pixels = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    texts = [f"what color is the {w}?" for w in rng.choice(["circle", "square", "triangle"], n)]
    reference = None
    for precision in manifest.precisions():
        pipe = ModelPipeline(Path(bundle_dir), Settings(precision=precision, providers="CPUExecutionProvider"))  # type: ignore[arg-type]
        probs, _ = pipe.classify(pixels, texts)
        ok_sum = bool(np.allclose(probs.sum(1), 1.0, atol=1e-3))
        entry = {"probabilities_sum_to_1": ok_sum}
        if reference is None:
            reference = probs
        else:
            entry["top1_agreement_vs_fp32"] = float((probs.argmax(1) == reference.argmax(1)).mean())
            entry["max_abs_prob_diff_vs_fp32"] = float(np.abs(probs - reference).max())
        report["variants"][precision] = entry
        report["ok"] = report["ok"] and ok_sum
    report["recorded_parity"] = manifest.parity.model_dump()
    return report
