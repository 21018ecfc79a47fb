"""Baseline (c): the server a FastAPI + PyTorch tutorial produces. Deliberately naive, do not "fix" it.

What the tutorials do, and what this file therefore does: load the model at import time, one
``async def`` endpoint taking an ``UploadFile`` and a form field, PIL decode + resize + crop +
normalise on the full-size image (no JPEG draft mode), tokenise, one eager forward per request under
``torch.no_grad()`` right on the event loop (so requests are served one at a time), softmax, JSON.
No batching, no thread sizing, no ONNX. Same weights as the bundle: the training run's checkpoint
(``--run``), or the rebuild described in ``benchmarks/eager.py`` when no run is given.

    python -m benchmarks.baselines.naive_torch_server --bundle models/default --run RUN_DIR --port 8100
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, Form, UploadFile
from PIL import Image

from app.bundle.verify import load_bundle_manifest
from app.preprocessing.text import TextTokenizer
from benchmarks.eager import load_eager

BUNDLE = Path(os.environ.get("NAIVE_BUNDLE", "models/default"))
RUN = os.environ.get("NAIVE_RUN") or None

manifest = load_bundle_manifest(BUNDLE)
model = load_eager(BUNDLE, Path(RUN) if RUN else None).model
model.eval()
tokenizer = TextTokenizer(BUNDLE / manifest.text.tokenizer_file, manifest.text.max_length, manifest.text.pad_id)
labels = manifest.labels
pre = manifest.image

app = FastAPI(title="naive torch baseline")


def preprocess(data: bytes) -> torch.Tensor:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    scale = pre.resize_size / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - pre.size) // 2, (h - pre.size) // 2
    img = img.crop((left, top, left + pre.size, top + pre.size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(pre.mean, dtype=np.float32)) / np.array(pre.std, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy()).unsqueeze(0)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/classify")
async def classify(image: UploadFile = File(...), text: str = Form(...)) -> dict[str, list[dict[str, object]]]:
    pixels = preprocess(await image.read())
    enc = tokenizer.encode([text])
    with torch.no_grad():
        logits = model(pixels, torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
        probs = torch.softmax(logits, dim=-1)[0]
    order = torch.argsort(probs, descending=True).tolist()
    return {"predictions": [{"label": labels[i], "score": float(probs[i])} for i in order]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
