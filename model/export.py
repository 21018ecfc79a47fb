"""Export a training run to an ONNX model bundle and prove ONNX Runtime reproduces PyTorch.

Uses the legacy TorchScript exporter (``dynamo=False``): on this stack it exports in under a
second at opset 17 with dynamic batch/sequence axes and gives a faster text graph than the
dynamo exporter (measured, see shared FIELD-NOTES).

``int8=True`` adds an INT8 variant of every graph, chosen per graph by measurement (see
``model/quantize.py``); a graph INT8 does not help on this CPU gets the fp32 file as its int8 variant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image

from app.bundle.manifest import (
    EXPORT_ID_KEY,
    MANIFEST_FILE,
    BundleManifest,
    GraphFile,
    GraphSpec,
    ImagePreprocessing,
    ModelInfo,
    ParityReport,
    TensorSpec,
    TextPreprocessing,
    VariantQuality,
)
from app.bundle.verify import load_bundle_manifest, sha256_file
from app.inference.runtime import MIN_TOP1_AGREEMENT, auto_serves
from app.preprocessing.image import preprocess_pil
from app.preprocessing.text import TextTokenizer
from model.data.rows import Row
from model.errors import OutputFolderError, ParityError
from model.fusion_model import FusionHeadGraph, FusionModel, ImageEncoderGraph, TextEncoderGraph
from model.quantize import Int8Options, Int8Report, QuantData, Samples, load_samples, quantize_graphs, spread_rows
from model.train import load_run

log = logging.getLogger("mmfusion.export")

OPSET = 17
PROB_TOLERANCE = 1e-4
COSINE_TOLERANCE = 0.9999
QUANTIZATION_REPORT = "quantization.json"
"""Written next to the graphs by ``--int8``: per-graph candidates, speeds and the choice made (for
humans; not part of the hashed contract, the manifest's ``quality`` carries the figures that matter)."""

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
}


@dataclass
class ParityInputs:
    pixel_values: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray


def _tensor_specs(values: list[onnx.ValueInfoProto]) -> list[TensorSpec]:
    specs = []
    for v in values:
        tt = v.type.tensor_type
        shape: list[int | str] = [
            d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tt.shape.dim
        ]
        specs.append(TensorSpec(name=v.name, dtype=_ONNX_DTYPES[tt.elem_type], shape=shape))  # type: ignore[arg-type]
    return specs


def _export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: dict[str, dict[int, str]],
) -> GraphSpec:
    # The exporter restores the wrapper's training flag afterwards, recursively: a wrapper left
    # in train mode would silently flip BatchNorm/Dropout of the wrapped model back to training.
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    graph = proto.graph
    # The exporter names output axes it cannot size statically after the op that made them
    # ("Divimage_embedding_dim_1"); only the declared dynamic axes (batch, sequence) vary, so every other
    # axis is recorded with the size the module really produces, and the manifest states the widths
    # that the server checks (app/inference/contract.py).
    with torch.no_grad():
        produced = module(*args)
    produced = produced if isinstance(produced, tuple | list) else (produced,)
    outputs_spec = []
    for spec, tensor in zip(_tensor_specs(list(graph.output)), produced, strict=True):
        dynamic_names = set(dynamic.get(spec.name, {}).values())
        shape = [d if isinstance(d, int) or d in dynamic_names else int(tensor.shape[axis])
                 for axis, d in enumerate(spec.shape)]
        outputs_spec.append(spec.model_copy(update={"shape": shape}))
    return GraphSpec(
        opset=OPSET,
        inputs=_tensor_specs(list(graph.input)),
        outputs=outputs_spec,
        variants={"fp32": GraphFile(file=path.name, sha256=sha256_file(path), size_bytes=path.stat().st_size)},
    )


def stamp_export_id(bundle_dir: Path, graphs: dict[str, GraphSpec]) -> dict[str, GraphSpec]:
    """Write one export id into every graph file's ONNX metadata (``EXPORT_ID_KEY``) and return the specs
    with the files' new sha256 and size.

    Why: the sha256s prove each file is the exporter's, not that the three graphs come from the same
    export; a graph taken from another run with the same shapes, its hash updated, used to be served
    beside the others and give wrong answers. The id is a hash of the unstamped files' own hashes, so
    exporting the same weights twice still gives byte-identical files (and the same index fingerprint).
    """
    files = sorted({v.file for spec in graphs.values() for v in spec.variants.values()})
    digest = hashlib.sha256("".join(sha256_file(bundle_dir / f) for f in files).encode()).hexdigest()[:32]
    for rel in files:
        proto = onnx.load(str(bundle_dir / rel))
        kept = [p for p in proto.metadata_props if p.key != EXPORT_ID_KEY]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)
        proto.metadata_props.add(key=EXPORT_ID_KEY, value=digest)
        onnx.save(proto, str(bundle_dir / rel))
    # Once per file: variants may share one (an int8 variant that is the fp32 file).
    written = {rel: {"sha256": sha256_file(bundle_dir / rel), "size_bytes": (bundle_dir / rel).stat().st_size}
               for rel in files}
    return {role: spec.model_copy(update={"variants": {name: v.model_copy(update=written[v.file])
                                                       for name, v in spec.variants.items()}})
            for role, spec in graphs.items()}


def export_graphs(model: FusionModel, out_dir: Path, image_size: int) -> dict[str, GraphSpec]:
    model.eval()
    pix = torch.randn(2, 3, image_size, image_size)
    ids = torch.ones(2, 7, dtype=torch.long)
    mask = torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        ip, ir = model.encode_image(pix)
        tp, tt = model.encode_text(ids, mask)
    b, bs = {0: "batch"}, {0: "batch", 1: "sequence"}
    return {
        "image_encoder": _export(
            ImageEncoderGraph(model),
            (pix,),
            out_dir / "image_encoder.onnx",
            ["pixel_values"],
            ["image_features", "image_regions", "image_embedding"],
            {"pixel_values": b, "image_features": b, "image_regions": b, "image_embedding": b},
        ),
        "text_encoder": _export(
            TextEncoderGraph(model),
            (ids, mask),
            out_dir / "text_encoder.onnx",
            ["input_ids", "attention_mask"],
            ["text_features", "text_tokens", "text_embedding"],
            {"input_ids": bs, "attention_mask": bs, "text_features": b, "text_tokens": bs, "text_embedding": b},
        ),
        "fusion_head": _export(
            FusionHeadGraph(model),
            (ip, ir, tp, tt, mask),
            out_dir / "fusion_head.onnx",
            ["image_features", "image_regions", "text_features", "text_tokens", "attention_mask"],
            ["probabilities"],
            {
                "image_features": b,
                "image_regions": b,
                "text_features": b,
                "text_tokens": bs,
                "attention_mask": bs,
                "probabilities": b,
            },
        ),
    }


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feed(sess: ort.InferenceSession, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: values[i.name] for i in sess.get_inputs()}


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return float((a * b).sum(1).min())


def measure_parity(
    model: FusionModel, graph_dir: Path, graphs: dict[str, GraphSpec], inputs: ParityInputs, source: str
) -> ParityReport:
    """Run the same inputs through PyTorch and ONNX Runtime and compare every output that matters."""
    sessions = {role: _session(graph_dir / spec.variants["fp32"].file) for role, spec in graphs.items()}
    pix, ids, mask = (torch.from_numpy(x) for x in (inputs.pixel_values, inputs.input_ids, inputs.attention_mask))
    with torch.no_grad():
        t_img = [t.numpy() for t in ImageEncoderGraph(model).eval()(pix)]
        t_txt = [t.numpy() for t in TextEncoderGraph(model).eval()(ids, mask)]
        t_prob = (
            FusionHeadGraph(model)
            .eval()(*(torch.from_numpy(x) for x in (t_img[0], t_img[1], t_txt[0], t_txt[1])), mask)
            .numpy()
        )
    o_img = sessions["image_encoder"].run(None, {"pixel_values": inputs.pixel_values})
    o_txt = sessions["text_encoder"].run(
        None, _feed(sessions["text_encoder"], {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask})
    )
    values = {
        "image_features": o_img[0],
        "image_regions": o_img[1],
        "text_features": o_txt[0],
        "text_tokens": o_txt[1],
        "attention_mask": inputs.attention_mask,
    }
    o_prob = sessions["fusion_head"].run(None, _feed(sessions["fusion_head"], values))[0]
    return ParityReport(
        max_abs_prob_diff=float(np.abs(o_prob - t_prob).max()),
        min_image_embedding_cosine=_min_cosine(o_img[2], t_img[2]),
        min_text_embedding_cosine=_min_cosine(o_txt[2], t_txt[2]),
        samples=len(inputs.pixel_values),
        inputs=source,
    )


def parity_inputs(
    image_pre: ImagePreprocessing,
    tokenizer: TextTokenizer,
    vocab_size: int,
    real: list[tuple[Path, str]],
    n_random: int = 8,
    seed: int = 0,
) -> tuple[ParityInputs, str]:
    """Fresh random tensors plus real (image, text) samples, padded into one batch."""
    rng = np.random.default_rng(seed)
    size = image_pre.size
    pix = [rng.standard_normal((n_random, 3, size, size)).astype(np.float32)]
    texts = [
        " ".join(rng.choice(["a", "red", "circle", "what", "is", "there", "blue"], rng.integers(1, 9)))
        for _ in range(n_random)
    ]
    for path, text in real:
        with Image.open(path) as img:
            pix.append(preprocess_pil(img, image_pre)[None])
        texts.append(text)
    enc = tokenizer.encode(texts)
    ids = enc.input_ids.copy()
    # Random ids (not only real words) for the random half, within the tokenizer's vocabulary.
    rand_ids = rng.integers(1, max(2, vocab_size), size=ids[:n_random].shape)
    ids[:n_random] = np.where(enc.attention_mask[:n_random] == 1, rand_ids, ids[:n_random])
    source = f"{n_random} random" + (f" + {len(real)} real samples" if real else "")
    return ParityInputs(np.concatenate(pix), ids, enc.attention_mask), source


def quant_data(rows_by_split: dict[str, list[Row]], image_pre: ImagePreprocessing, labels: list[str],
               options: Int8Options, seed: int = 0) -> QuantData:
    """Calibration from train, selection from val, recorded quality from test (falling back to the
    next split when one is empty, so a user dataset without a val split still exports)."""

    def pick(*names: str) -> list[Row]:
        for n in names:
            if rows_by_split.get(n):
                return rows_by_split[n]
        raise ValueError("the dataset has no rows to calibrate and evaluate the int8 variant on")

    calib = spread_rows(pick("train", "val", "test"), seed)[: options.calibration_samples]
    select = spread_rows(pick("val", "test", "train"), seed)[: options.selection_samples]
    evaluate = pick("test", "val", "train")[: options.evaluation_samples]
    return QuantData(load_samples(calib, image_pre, labels), load_samples(select, image_pre, labels),
                     load_samples(evaluate, image_pre, labels))


def add_int8_variants(
    bundle_dir: Path,
    graphs: dict[str, GraphSpec],
    tokenizer: TextTokenizer,
    data: QuantData,
    options: Int8Options,
    progress: bool = False,
) -> tuple[dict[str, GraphSpec], VariantQuality, Int8Report]:
    """Quantize the fp32 graphs in ``bundle_dir`` and return the graphs with their ``int8`` variants."""
    fp32_files = {role: spec.variants["fp32"].file for role, spec in graphs.items()}
    files, report = quantize_graphs(bundle_dir, fp32_files, tokenizer, data, options, progress=progress)
    return with_variant(bundle_dir, graphs, "int8", files), variant_quality(report), report


def add_fp16_variants(bundle_dir: Path, graphs: dict[str, GraphSpec], tokenizer: TextTokenizer, samples: Samples
                      ) -> tuple[dict[str, GraphSpec], VariantQuality, Int8Report]:
    """Convert the fp32 graphs in ``bundle_dir`` to float16 (for GPUs) and measure what that costs."""
    from model.fp16 import add_fp16_files

    fp32_files = {role: spec.variants["fp32"].file for role, spec in graphs.items()}
    files, report = add_fp16_files(bundle_dir, fp32_files, tokenizer, samples)
    return with_variant(bundle_dir, graphs, "fp16", files), variant_quality(report), report


def with_variant(bundle_dir: Path, graphs: dict[str, GraphSpec], precision: str, files: dict[str, str]
                 ) -> dict[str, GraphSpec]:
    """The graphs with one more precision variant each (file name, sha256 and size recorded)."""
    updated: dict[str, GraphSpec] = {}
    for role, spec in graphs.items():
        path = bundle_dir / files[role]
        variant = GraphFile(file=files[role], sha256=sha256_file(path), size_bytes=path.stat().st_size)
        updated[role] = spec.model_copy(update={"variants": {**spec.variants, precision: variant}})
    return updated


def variant_quality(report: Int8Report) -> VariantQuality:
    return VariantQuality(
        top1_agreement=report.top1_agreement,
        accuracy=report.accuracy,
        accuracy_drop=report.accuracy_drop,
        min_embedding_cosine=report.min_embedding_cosine,
        samples=report.samples,
        cpu_features=report.cpu_features,
    )


def auto_precision_note(precision: str, quality: VariantQuality) -> str | None:
    """What to tell the exporter when ``MMFUSION_PRECISION=auto`` will not serve this variant: its recorded
    (test-split) agreement is under the server's bar, which the validation split that chose it can pass
    (measured: 0.991 on validation, 0.989 on test). Without this, the bundle ships a variant that is
    silently never used."""
    agreement = quality.top1_agreement
    if agreement is None or auto_serves(quality):
        return None
    return (f"the {precision} variant's recorded top-1 agreement with fp32 is {agreement:.4f} on {quality.samples} "
            f"test samples, under the {MIN_TOP1_AGREEMENT} that MMFUSION_PRECISION=auto requires: the server will "
            f"serve fp32 unless MMFUSION_PRECISION={precision} is set (or re-export with a higher --min-agreement)")


def check_output_folder(out_dir: Path, run_dir: Path) -> None:
    """Refuse an ``--out`` whose replacement would delete something that is not a bundle.

    Export replaces ``out_dir`` whole (old bundle aside, new one in, old one deleted). That is right for
    a bundle being re-exported and wrong for anything else: ``--out`` pointed at the run folder deleted
    its checkpoints, and at a folder of the user's own files deleted them."""
    out, run = out_dir.resolve(), Path(run_dir).resolve()
    if out == run or out in run.parents:
        raise OutputFolderError(f"--out {out_dir} would replace the run folder {run_dir} (it holds the checkpoints); "
                                "export to a folder of its own, e.g. models/NAME")
    if out.exists():
        if not out.is_dir():
            raise OutputFolderError(f"--out {out_dir} is a file; give a folder for the bundle")
        if any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
            raise OutputFolderError(f"--out {out_dir} exists and is not a bundle (no {MANIFEST_FILE}): export "
                                    "replaces the whole folder, so give a new or empty folder, or a bundle to replace")


def export_bundle(
    run_dir: Path,
    out_dir: Path,
    *,
    which: str = "best",
    real_samples: int = 32,
    metrics: dict[str, int | float] | None = None,
    progress: bool = True,
    int8: bool = False,
    int8_options: Int8Options | None = None,
    fp16: bool = False,
) -> BundleManifest:
    """Write ONNX graphs + tokenizer + labels + manifest.json, refusing to ship on a parity failure.

    ``int8`` adds an ``int8`` variant per graph (see ``model/quantize.py``): calibrated on training
    samples, chosen by measured speed and fidelity, with its top-1 agreement with fp32 on the test
    split recorded in ``quality["int8"]``. ``fp16`` adds an ``fp16`` variant for GPUs (see
    ``model/fp16.py``), its quality measured on the same test samples and recorded in ``quality["fp16"]``.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir).resolve()
    check_output_folder(out_dir, run_dir)
    model, cfg, ckpt = load_run(run_dir, which)
    image_pre = ImagePreprocessing.model_validate(ckpt["image_preprocessing"])
    labels: list[str] = ckpt["labels"]
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        graphs = export_graphs(model, tmp, image_pre.size)
        shutil.copyfile(run_dir / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        tokenizer = TextTokenizer(tmp / "tokenizer.json", int(ckpt["max_length"]))
        real: list[tuple[Path, str]] = []
        data = None
        if real_samples or int8 or fp16:
            from model.data.prepared import prepare_data

            data = prepare_data(cfg, progress=False)
        if real_samples and data is not None:
            rows = data.split("test") or data.split("val") or data.rows
            real = [(r.image, r.text) for r in rows[:real_samples]]
        vocab = tokenizer._tok.get_vocab_size()
        inputs, source = parity_inputs(image_pre, tokenizer, vocab, real, seed=cfg.seed)
        parity = measure_parity(model, tmp, graphs, inputs, source)
        if (
            parity.max_abs_prob_diff > PROB_TOLERANCE
            or parity.min_image_embedding_cosine < COSINE_TOLERANCE
            or parity.min_text_embedding_cosine < COSINE_TOLERANCE
        ):
            raise ParityError(f"ONNX Runtime does not reproduce PyTorch: {parity.model_dump()}")
        quality: dict[str, VariantQuality] = {}
        if int8 and data is not None:
            options = int8_options or Int8Options()
            splits = {s: data.split(s) for s in ("train", "val", "test")}
            qdata = quant_data(splits, image_pre, labels, options, cfg.seed)
            if progress:
                print("int8: measuring candidates per graph (speed at batch 1/8, fidelity on the val split)")
            graphs, quality["int8"], report = add_int8_variants(tmp, graphs, tokenizer, qdata, options, progress)
            (tmp / QUANTIZATION_REPORT).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
            if progress:
                print(report.table())
            note = auto_precision_note("int8", quality["int8"])
            if note and progress:
                print(f"int8: warning: {note}")
            elif note:
                log.warning(note)
        if fp16 and data is not None:
            limit = (int8_options or Int8Options()).evaluation_samples
            evaluate = (data.split("test") or data.split("val") or data.rows)[:limit]
            if progress:
                print(f"fp16: converting the graphs and measuring them against fp32 on {len(evaluate)} samples")
            graphs, quality["fp16"], fp16_report = add_fp16_variants(tmp, graphs, tokenizer,
                                                                     load_samples(evaluate, image_pre, labels))
            if progress:
                print(f"fp16: top-1 agreement with fp32 {fp16_report.top1_agreement:.4f}, min embedding cosine "
                      f"{fp16_report.min_embedding_cosine:.5f} on {fp16_report.samples} samples")
        graphs = stamp_export_id(tmp, graphs)
        # Counts (the epoch) stay integers; bools are not metrics.
        all_metrics: dict[str, int | float] = {
            k: v if isinstance(v, int) else float(v)
            for k, v in (ckpt.get("metrics") or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}
        all_metrics.update(metrics or {})
        manifest = BundleManifest(
            name=cfg.name,
            version=cfg.version,
            created_at=datetime.now(UTC),
            tasks=list(ckpt.get("tasks") or ["classification", "retrieval"]),  # older checkpoints: both
            labels=labels,
            embedding_dim=cfg.embed_dim,
            image=image_pre,
            text=TextPreprocessing(
                tokenizer_file="tokenizer.json",
                tokenizer_sha256=sha256_file(tmp / "tokenizer.json"),
                max_length=int(ckpt["max_length"]),
            ),
            graphs=graphs,  # type: ignore[arg-type]
            parity=parity,
            quality=quality,  # type: ignore[arg-type]
            metrics=all_metrics,
            model=ModelInfo(
                image_encoder=cfg.image_encoder,
                text_encoder=cfg.text_encoder,
                fusion=cfg.fusion,
                parameters=sum(p.numel() for p in model.parameters()),
            ),
        )
        manifest_text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
        (tmp / MANIFEST_FILE).write_text(manifest_text, encoding="utf-8")
        load_bundle_manifest(tmp)  # the exported bundle must pass the same check the server runs
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(old)  # aside, not deleted, until the new bundle is in place
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a refused or failed export leaves nothing half-written behind
        raise
