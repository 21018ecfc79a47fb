"""``mmfusion build-default``: the bundle ``make serve`` serves when none is given.

Generates the demo data, trains, exports with parity checks, verifies, and seeds a search
index with the held-out images so that /v1/search answers out of the box.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from model.config import TrainConfig


def default_config(out: Path, fast: bool = False) -> TrainConfig:
    """The real default; ``fast`` is a seconds-long from-scratch variant for tests."""
    work = out.parent / f".{out.name}-work"
    common = dict(data="demo", demo_dir=str(work / "demo"), run_dir=str(work / "run"), name="mmfusion-demo",
                  version="0.1.0", seed=0)
    if fast:
        return TrainConfig(**common, demo_images=160, demo_image_size=96, image_size=64, epochs=2,  # type: ignore[arg-type]
                           batch_size=32, hidden_dim=64, embed_dim=32,
                           encoder_kwargs={"image": {"width": 8, "out_dim": 32},
                                           "text": {"embed_dim": 16, "hidden": 16}})
    return TrainConfig(**common, image_encoder="small_cnn", text_encoder="bilstm", fusion="concat",  # type: ignore[arg-type]
                       demo_images=600, image_size=64, epochs=12, batch_size=64)


def build_seed_index(bundle: Path, demo_root: Path, split: str = "test", progress: bool = True) -> int:
    """Embed the held-out demo images with the exported bundle (ONNX Runtime, as served)."""
    import numpy as np
    from PIL import Image

    from app.bundle import load_bundle_manifest
    from app.core.config import Settings
    from app.index import Item, VectorIndex
    from app.inference.pipeline import ModelPipeline
    from app.preprocessing.image import preprocess_pil

    manifest = load_bundle_manifest(bundle)
    pipe = ModelPipeline(bundle, Settings(providers="CPUExecutionProvider"))  # type: ignore[arg-type]
    rows = [json.loads(line) for line in (demo_root / "captions.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if r["split"] == split]
    seed_dir = bundle / "seed_index"
    shutil.rmtree(seed_dir, ignore_errors=True)
    index = VectorIndex.open(seed_dir, bundle_name=manifest.name, bundle_version=manifest.version,
                             dim=manifest.embedding_dim, durable=False)
    items = []
    for start in tqdm(range(0, len(rows), 32), desc="seed index", disable=not progress, leave=False):
        chunk = rows[start : start + 32]
        pixels = np.stack([preprocess_pil(Image.open(demo_root / r["image"]), manifest.image) for r in chunk])
        emb = pipe.embed_images(pixels)
        for r, vec in zip(chunk, emb, strict=True):
            items.append(Item(id=Path(r["image"]).stem, vector=vec, text=r["text"],
                                   metadata={"split": split, "source": "demo", "image": r["image"]}))
    index.add_many(items)
    index.close()
    return len(items)


def build_default(out: Path, *, progress: bool = True, fast: bool = False) -> Path:
    from model.export import export_bundle
    from model.train import evaluate_run, train

    t0 = time.perf_counter()
    cfg = default_config(out, fast)
    run_dir = train(cfg, progress=progress)
    test_metrics = evaluate_run(run_dir, "test")
    export_bundle(run_dir, out, metrics=test_metrics, progress=progress)
    n = build_seed_index(out, Path(cfg.demo_dir), progress=progress)
    _register_seed_index(out)
    if progress:
        shown = {k: round(v, 4) for k, v in test_metrics.items() if "median" not in k}
        print(f"default bundle at {out} in {time.perf_counter() - t0:.0f}s; {n} items indexed; test metrics {shown}")
    return out


def _register_seed_index(bundle: Path) -> None:
    """Point the manifest at seed_index/ (not hashed: the index checks its own records)."""
    from app.bundle import load_bundle_manifest

    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data["seed_index"] = "seed_index"
    path.write_text(json.dumps(data, indent=2) + "\n")
    load_bundle_manifest(bundle)
