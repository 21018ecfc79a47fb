"""Baseline (d): LitServe serving the same ONNX bundle, with LitServe's own dynamic batching.

The model work is mmfusion's own (``ModelPipeline``: the bundle's ONNX Runtime sessions, the same
precision choice, the same ``decode_image``), so this compares the serving layers only: LitServe's
API process -> worker process queue, its batcher (``max_batch_size``, ``batch_timeout``), its
(de)serialisation, against mmfusion's in-process batching. The image comes base64 in a JSON body
(``{"image": "<base64>", "text": "..."}``), LitServe's documented pattern: a multipart upload
cannot be used, LitServe pickles the parsed form (with its open upload file) into the worker
queue and fails ("Pickling an AuthenticationString object is disallowed").

    python -m benchmarks.baselines.litserve_server --bundle models/default --port 8200 \
        --max-batch-size 8 --batch-timeout 0.005
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np

from app.core.config import Settings
from app.inference.pipeline import ModelPipeline
from app.preprocessing.image import decode_image


class ClassifyAPI(ls.LitAPI):
    def __init__(self, bundle: Path, threads: int = 0, text_cache_size: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.bundle = bundle
        self.threads = threads
        self.text_cache_size = text_cache_size

    def setup(self, device: str) -> None:
        # With several workers each gets its share of the CPUs, as mmfusion splits its threads.
        self.settings = Settings(bundle=self.bundle, index_path=Path(tempfile.mkdtemp()) / "unused",
                                 intra_op_threads=self.threads, text_cache_size=self.text_cache_size)
        self.pipeline = ModelPipeline(self.bundle, self.settings)
        self.pipeline.warmup()

    def decode_request(self, request: dict[str, str]) -> tuple[np.ndarray, str]:
        data = base64.b64decode(request["image"])
        pixels = decode_image(data, self.pipeline.manifest.image, max_pixels=self.settings.max_image_pixels)
        return pixels, str(request["text"])

    def batch(self, inputs: list[tuple[np.ndarray, str]]) -> tuple[np.ndarray, list[str]]:
        return np.stack([p for p, _ in inputs]), [t for _, t in inputs]

    def predict(self, x: Any) -> Any:
        if isinstance(x, tuple) and isinstance(x[0], np.ndarray) and x[0].ndim == 4:
            return self.pipeline.classify(x[0], x[1])[0]
        pixels, text = x
        return self.pipeline.classify(pixels[None], [text])[0][0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict[str, list[dict[str, object]]]:
        labels = self.pipeline.manifest.labels
        order = np.argsort(-output)
        return {"predictions": [{"label": labels[i], "score": float(output[i])} for i in order]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/default"))
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    parser.add_argument("--workers", type=int, default=1, help="LitServe workers (each decodes and predicts)")
    parser.add_argument("--text-cache-size", type=int, default=0, help="the pipeline's text-encoder cache")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = 0 if args.workers == 1 else max(1, cpus // args.workers)
    api = ClassifyAPI(args.bundle, threads=threads, text_cache_size=args.text_cache_size,
                      max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, api_path="/v1/classify")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=120)
    server.run(port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
