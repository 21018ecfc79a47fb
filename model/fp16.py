"""fp16 variants of a bundle's graphs, for GPUs.

Why a separate variant rather than casting at load time: the server never imports a converter and a
bundle states what it was checked with. Why ONNX Runtime's own converter
(``onnxruntime.transformers.float16``) and not ``onnxconverter-common``: measured on this bundle,
onnxconverter-common 1.16 leaves ``Cast(to=float)`` outputs typed float16, and all three graphs then
fail to load ("Type (tensor(float16)) of output arg ... does not match expected type"); ONNX
Runtime's copy of the converter loads and runs them, and it is already installed.

Inputs and outputs stay float32 (``keep_io_types``), so the server feeds every precision the same
arrays. The quality recorded in the manifest is measured on the CPU, where ONNX Runtime runs the
float16 graph with float16 weights and activations between nodes (inserting casts around kernels
it only has in float32): it catches what float16 storage breaks (overflow, lost small weights),
which is what a converter gets wrong. Speed is a GPU matter, measured by ``benchmarks/gpu_check.py``
(which also re-checks parity with the CUDA provider).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx

from app.preprocessing.text import TextTokenizer
from model.quantize import ROLES, Int8Report, Samples, measure_quality

log = logging.getLogger("mmfusion.fp16")

# Ops kept in float32 inside the fp16 graph: reductions and normalisations whose float16 range or
# precision loses answers (sums of squares overflow 65504; softmax/layer norm need the mantissa).
FP32_OPS = ["ReduceL2", "ReduceSum", "ReduceMean", "LayerNormalization", "Softmax", "Pow", "Sqrt", "Div", "Erf"]


def convert_graph(src: Path, dst: Path) -> Path:
    """Write the float16 twin of ``src`` (float32 inputs/outputs, the same names) to ``dst``."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    with warnings.catch_warnings():  # one warning per tiny weight clamped to fp16's smallest normal
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True,
                                        op_block_list=sorted({*DEFAULT_OP_BLOCK_LIST, *FP32_OPS}))
    # The converter appends its input/output casts at the end of the node list; ONNX requires a
    # topological order (ONNX Runtime tolerates the disorder, the checker and other runtimes do not).
    OnnxModel(half).topological_sort()
    onnx.checker.check_model(half, full_check=True)
    onnx.save(half, str(dst))
    return dst


def add_fp16_files(graph_dir: Path, fp32_files: dict[str, str], tokenizer: TextTokenizer, samples: Samples,
                   threads: int = 0) -> tuple[dict[str, str], Int8Report]:
    """Convert every graph and measure the fp16 pipeline against fp32 on real samples.

    Returns (role -> fp16 file name, the quality figures: top-1 agreement, accuracy, min embedding
    cosine, in the same report type the INT8 search records).
    """
    graph_dir = Path(graph_dir)
    files: dict[str, str] = {}
    for role in ROLES:
        name = f"{Path(fp32_files[role]).stem}.fp16.onnx"
        convert_graph(graph_dir / fp32_files[role], graph_dir / name)
        files[role] = name
    report = measure_quality(graph_dir, fp32_files, files, tokenizer, samples, threads)
    log.info("fp16: top-1 agreement %.4f, min embedding cosine %.4f on %d samples", report.top1_agreement,
             report.min_embedding_cosine, report.samples)
    return files, report
