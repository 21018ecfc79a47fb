"""``mmfusion ablate``: every fusion strategy plus single-modality baselines, same data, one table.

The baselines answer the question every fusion result must face: does the model use both
modalities at all? The demo task is built so that neither modality alone suffices (see
``model/data/demo.py``), so ``image_only`` and ``text_only`` should land far below real fusion; if
a fusion strategy does not beat them, it is not fusing.

The baselines are fusion-like modules registered in ``FUSIONS`` under ``image_only`` and
``text_only`` (importing this module registers them), so they train, export and serve through
exactly the same code as every other strategy. The contrastive retrieval head still sees both
encoders, so their retrieval numbers are comparable with the others'.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.config import TrainConfig
from model.errors import UnknownNameError
from model.fusion import FUSIONS, Fusion

BASELINES = ("image_only", "text_only")


class SingleModalityFusion(Fusion):
    """An MLP over one modality's pooled features; the other modality's inputs are ignored."""

    def __init__(self, modality: str, in_dim: int, hidden_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        self.modality = modality
        self.out_dim = hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim), nn.GELU()
        )

    def forward(
        self,
        image_pooled: torch.Tensor,
        image_regions: torch.Tensor,
        text_pooled: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        return self.mlp(image_pooled if self.modality == "image" else text_pooled)


def build_image_only(image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1, *,
                     num_classes: int | None = None, num_regions: int | None = None,
                     sequence_stage: str = "none") -> Fusion:
    """Baseline: classify from the image alone (the question text never reaches the classifier)."""
    return SingleModalityFusion("image", image_dim, hidden_dim, dropout)


def build_text_only(image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1, *,
                    num_classes: int | None = None, num_regions: int | None = None,
                    sequence_stage: str = "none") -> Fusion:
    """Baseline: classify from the question alone (the answer prior given the words)."""
    return SingleModalityFusion("text", text_dim, hidden_dim, dropout)


def register_baselines() -> None:
    """Idempotent: if ``model/fusion`` ever ships these names itself, its versions win."""
    for name, builder in (("image_only", build_image_only), ("text_only", build_text_only)):
        if name not in FUSIONS:
            FUSIONS.register(name)(builder)


register_baselines()


def fast_config(work_dir: Path, seed: int = 0) -> TrainConfig:
    """Small from-scratch encoders: the whole ablation runs in minutes on two cores."""
    return TrainConfig(
        data="demo", demo_dir=str(work_dir / "demo"), demo_images=600, demo_image_size=96, image_size=64,
        image_encoder="small_cnn", text_encoder="bilstm", epochs=10, batch_size=64, hidden_dim=128,
        embed_dim=64, seed=seed, name="ablation", version="0.0.0",
        encoder_kwargs={"image": {"width": 16, "out_dim": 64}, "text": {"embed_dim": 32, "hidden": 32}},
    )


def pretrained_config(work_dir: Path, seed: int = 0) -> TrainConfig:
    """Exactly the default bundle's configuration (frozen ImageNet EfficientNet-Lite0 + MiniLM,
    cached features, the same demo data), with only the fusion strategy varied per row: the
    table then says what the shipped model gains over each alternative and each single modality.
    """
    from model.default_bundle import default_config

    work_dir = Path(work_dir)
    cfg = default_config(work_dir / "default")
    demo = work_dir / "demo"
    encoder_kwargs = {**cfg.encoder_kwargs, "feature_cache_dir": str(work_dir / ".feature-cache")}
    return dataclasses.replace(
        cfg, demo_dir=str(demo), data=str(demo / "qa.jsonl"), captions=str(demo / "captions.jsonl"),
        run_dir=str(work_dir / "run"), seed=seed, name="ablation", version="0.0.0", encoder_kwargs=encoder_kwargs,
    )


@dataclass
class AblationRow:
    fusion: str
    accuracy: float
    macro_f1: float
    text_to_image_r1: float | None
    image_to_text_r1: float | None
    train_seconds: float
    parameters: int
    trainable_parameters: int
    onnx_ms_per_item: float
    """Full classify pipeline (both encoders + fusion head), ONNX Runtime fp32, batch 8, per item."""
    epochs: int
    run_dir: str
    bundle: str


def onnx_ms_per_item(bundle: Path, batch: int = 8, seconds: float = 1.0) -> float:
    """Median latency of the served classify pipeline on a batch of real-shaped inputs, divided by the batch."""
    import numpy as np

    from app.core.config import Settings
    from app.inference.pipeline import ModelPipeline

    pipe = ModelPipeline(bundle, Settings(precision="fp32", providers="CPUExecutionProvider"))  # type: ignore[arg-type]
    size = pipe.manifest.image.size
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    texts = ["is there a small blue square at the top left?"] * batch
    for _ in range(3):
        pipe.classify(pixels, texts)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 10 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        pipe.classify(pixels, texts)
        times.append((time.perf_counter() - t) * 1000)
    return float(statistics.median(times)) / batch


def _count(model: nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def run_ablation(
    base: TrainConfig,
    work_dir: Path,
    fusions: list[str] | None = None,
    *,
    progress: bool = True,
) -> list[AblationRow]:
    """Train, evaluate (test split) and export one model per strategy; all share data and seed."""
    from model.export import export_bundle
    from model.train import evaluate_run, load_run, train

    names = fusions or [*[n for n in FUSIONS.names() if n not in BASELINES], *BASELINES]
    unknown = [n for n in names if n not in FUSIONS]
    if unknown:
        raise UnknownNameError(f"unknown fusion strategies {unknown}; choose from {FUSIONS.names()}")
    rows = []
    for name in names:
        cfg = dataclasses.replace(base, fusion=name, run_dir=str(work_dir / "runs" / name), name=f"ablation-{name}")
        if progress:
            print(f"[ablate] {name}: training")
        t0 = time.perf_counter()
        run_dir = train(cfg, progress=progress)
        seconds = time.perf_counter() - t0
        metrics = {k.removeprefix("test_"): v for k, v in evaluate_run(run_dir, "test").items()}
        model, _, _ = load_run(run_dir)
        total, trainable = _count(model)
        bundle = work_dir / "bundles" / name
        export_bundle(run_dir, bundle, progress=False)
        epochs = sum(1 for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip())
        row = AblationRow(
            fusion=name, accuracy=float(metrics.get("accuracy", float("nan"))),
            macro_f1=float(metrics.get("macro_f1", float("nan"))),
            text_to_image_r1=metrics.get("text_to_image_R@1"), image_to_text_r1=metrics.get("image_to_text_R@1"),
            train_seconds=seconds, parameters=total, trainable_parameters=trainable,
            onnx_ms_per_item=onnx_ms_per_item(bundle), epochs=epochs, run_dir=str(run_dir), bundle=str(bundle),
        )
        rows.append(row)
        if progress:
            print(f"[ablate] {name}: accuracy {row.accuracy:.4f}, macro-F1 {row.macro_f1:.4f}, "
                  f"{row.train_seconds:.0f}s, {row.onnx_ms_per_item:.2f} ms/item")
    return rows


_COLUMNS = ("fusion", "accuracy", "macro-F1", "R@1 t->i", "R@1 i->t", "train s", "params", "trainable",
            "ONNX ms/item (b8)")


def _cells(r: AblationRow) -> list[str]:
    def f(v: float | None, digits: int = 4) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    return [r.fusion, f(r.accuracy), f(r.macro_f1), f(r.text_to_image_r1), f(r.image_to_text_r1),
            f"{r.train_seconds:.1f}", f"{r.parameters:,}", f"{r.trainable_parameters:,}", f(r.onnx_ms_per_item, 3)]


def format_table(rows: list[AblationRow]) -> str:
    cells = [list(_COLUMNS), *[_cells(r) for r in rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: list[AblationRow], meta: dict[str, Any]) -> str:
    head = "| " + " | ".join(_COLUMNS) + " |"
    sep = "|" + "|".join(["---"] + ["---:"] * (len(_COLUMNS) - 1)) + "|"
    body = ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    notes = [
        "# Fusion ablation",
        "",
        f"Mode: **{meta['mode']}** (image encoder `{meta['image_encoder']}`, text encoder `{meta['text_encoder']}`), "
        f"demo dataset with {meta['demo_images']} images, seed {meta['seed']}, up to {meta['epochs']} epochs "
        f"(early stopping on `{meta['early_stopping_metric']}`). Metrics on the held-out test split; "
        "R@1 is caption retrieval (text->image and image->text, best rank over an image's captions). "
        f"Latency: the exported bundle's full classify pipeline in ONNX Runtime fp32 at batch 8, per item, "
        f"on {meta['cpu']} (1-minute load average {meta['load_average_1m']['start']} at start, "
        f"{meta['load_average_1m']['end']} at end: timings are comparable only on an idle machine).",
        "",
        head,
        sep,
        *body,
        "",
    ]
    return "\n".join(notes)


def write_results(rows: list[AblationRow], out_dir: Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "ablation.json", out_dir / "ablation.md"
    js.write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2) + "\n",
                  encoding="utf-8")
    md.write_text(format_markdown(rows, meta), encoding="utf-8")
    return js, md


def ablate(
    *,
    pretrained: bool = False,
    work_dir: Path = Path("runs/ablation"),
    out_dir: Path = Path("benchmarks/results"),
    fusions: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[AblationRow]:
    """Run the ablation and write ``ablation.json`` + ``ablation.md`` into ``out_dir``."""
    import os

    from model.quantize import cpu_name

    work_dir = Path(work_dir)
    load_before = os.getloadavg()[0]
    base = pretrained_config(work_dir) if pretrained else fast_config(work_dir)
    if overrides:
        base = TrainConfig.from_dict({**base.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
    if pretrained:
        from model.default_bundle import generate_default_demo

        generate_default_demo(base, progress=progress)
    rows = run_ablation(base, work_dir, fusions, progress=progress)
    meta = {"mode": "pretrained" if pretrained else "fast", "image_encoder": base.image_encoder,
            "text_encoder": base.text_encoder, "demo_images": base.demo_images, "epochs": base.epochs,
            "seed": base.seed, "early_stopping_metric": base.early_stopping_metric, "cpu": cpu_name(),
            "torch_threads": torch.get_num_threads(),
            # Timings are only comparable on an otherwise idle machine; the load average says whether it was.
            "load_average_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}}
    write_results(rows, Path(out_dir), meta)
    return rows
