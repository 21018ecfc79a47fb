"""GPU path check: the bundle on ONNX Runtime's CUDA provider, parity against CPU, speed per graph.

Run it through ``benchmarks/gpu_check.sh`` on a machine with an NVIDIA GPU: that creates a venv
with nothing but the serving install plus ``onnxruntime-gpu`` (``pip install '.[gpu]'``, no torch)
and runs this file in it. What it does:

1. exits with a clear message (status 2) when ONNX Runtime has no usable CUDA provider;
2. loads every graph of the bundle with ``CUDAExecutionProvider`` for fp32 and, if the bundle has
   one, the fp16 variant (``cudnn_conv_algo_search=HEURISTIC``: EXHAUSTIVE benchmarks every conv
   algorithm on the first call of each shape, a multi-second cold start per batch size);
3. checks parity with the CPU provider's fp32 outputs on the same inputs (minimum cosine and max
   abs difference per output; fp32 must agree to 1e-3 cosine, fp16 to 1e-2);
4. times each graph at batch 1/8/32 two ways: ``run`` with host numpy in and out (what the server
   does) and IO binding with device-resident inputs/outputs (the kernel time without PCIe copies);
5. times the classify pipeline (``ModelPipeline.classify``) at batch 1/8/32 per precision;
6. where ONNX Runtime offers the TensorRT provider (it needs the TensorRT libraries, which the serving
   install does not bring), the same pipeline through ``TensorrtExecutionProvider`` as the server
   configures it (``app.inference.tensorrt``: one profile per graph, engine cache), its start-up time
   (engine builds) and its probabilities' agreement with the CUDA pipeline; otherwise why not.

Exit status 0 when every parity check passes, 1 otherwise, 2 without a GPU. JSON goes to
``benchmarks/results/gpu-check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from app.bundle.verify import load_bundle_manifest  # noqa: E402
from app.core.config import Settings  # noqa: E402
from app.core.errors import BundleError  # noqa: E402
from app.inference.pipeline import ModelPipeline  # noqa: E402
from app.inference.runtime import CUDA_OPTIONS  # noqa: E402
from app.inference.tensorrt import PROVIDER as TENSORRT  # noqa: E402
from app.preprocessing.text import TextTokenizer  # noqa: E402

QUESTIONS = ("what color is the circle?", "how many shapes are in the image?", "is there a large triangle?",
             "what shape is the small orange object?")
MIN_COSINE = {"fp32": 0.999, "fp16": 0.99}
NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--seconds", type=float, default=1.0, help="minimum timing per cell")
    p.add_argument("--device-id", type=int, default=None,
                   help="the CUDA device to check (default: the first visible one); applied as CUDA_VISIBLE_DEVICES, "
                   "as the server is pointed at a GPU, so the raw sessions and the serving pipeline use the same one")
    p.add_argument("--dry-run-on-cpu", action="store_true",
                   help="exercise this script without a GPU: the CPU provider stands in for CUDA (parity is trivially "
                   "1, timings are CPU timings); for testing the script only")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "gpu-check.json")
    return p.parse_args(argv)


def cuda_available(probe: Path | None = None, device_id: int = 0) -> str | None:
    """None when CUDA is usable, else why not. Listing the CUDA provider is not enough (onnxruntime-gpu
    always lists it): a session on ``probe`` must really run on it, else ONNX Runtime has fallen back to
    the CPU (no driver, or CUDA/cuDNN libraries of another major version)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"this ONNX Runtime ({ort.__version__}, providers {ort.get_available_providers()}) has no CUDA "
                "provider: install onnxruntime-gpu (benchmarks/gpu_check.sh does) on a machine with an NVIDIA GPU")
    if hasattr(ort, "preload_dlls"):  # the CUDA/cuDNN wheels of onnxruntime-gpu[cuda,cudnn] (ORT >= 1.21)
        try:
            ort.preload_dlls()
        except Exception as exc:  # reported by the probe below if it matters
            print(f"gpu_check: preloading the CUDA libraries failed: {exc}", file=sys.stderr)
    if probe is not None:
        try:
            sess = ort.InferenceSession(str(probe), providers=[("CUDAExecutionProvider", {"device_id": device_id}),
                                                               "CPUExecutionProvider"])
        except Exception as exc:
            return f"ONNX Runtime {ort.__version__} could not create a CUDA session: {exc}"
        if "CUDAExecutionProvider" not in sess.get_providers():
            return (f"ONNX Runtime {ort.__version__} lists CUDA but fell back to the CPU (no usable GPU, or CUDA/cuDNN "
                    "libraries that do not match this onnxruntime-gpu: 1.26 needs CUDA 12, 1.27+ CUDA 13)")
    return None


# Set by --dry-run-on-cpu: the "GPU" sessions are CPU sessions and IO binding uses host memory.
DRY_RUN = {"on": False}


def session(path: Path, cuda: bool, device_id: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    providers: list[Any] = (
        [("CUDAExecutionProvider", {**CUDA_OPTIONS, "device_id": str(device_id)}), "CPUExecutionProvider"]
        if cuda and not DRY_RUN["on"] else ["CPUExecutionProvider"]
    )
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    if cuda and not DRY_RUN["on"] and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"{path.name}: ONNX Runtime fell back to {sess.get_providers()} (CUDA libraries missing?)")
    return sess


def feeds_for(sess: ort.InferenceSession, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs this graph declares, cast to its declared types (fp16 graphs may take float16)."""
    return {i.name: values[i.name].astype(NP_TYPES.get(i.type, values[i.name].dtype), copy=False)
            for i in sess.get_inputs()}


def inputs(bundle: Path, batch: int, cpu: dict[str, ort.InferenceSession]) -> dict[str, dict[str, np.ndarray]]:
    """Per-graph inputs at ``batch``; the fusion head's are the CPU fp32 encoders' outputs."""
    manifest = load_bundle_manifest(bundle)
    rng = np.random.default_rng(batch)
    size = manifest.image.size
    pixels = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    tok = TextTokenizer(bundle / manifest.text.tokenizer_file, manifest.text.max_length, manifest.text.pad_id)
    enc = tok.encode([QUESTIONS[i % len(QUESTIONS)] for i in range(batch)])
    text = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    img_names = [o.name for o in cpu["image_encoder"].get_outputs()]
    txt_names = [o.name for o in cpu["text_encoder"].get_outputs()]
    img = dict(zip(img_names, cpu["image_encoder"].run(None, {"pixel_values": pixels}), strict=True))
    txt = dict(zip(txt_names, cpu["text_encoder"].run(None, feeds_for(cpu["text_encoder"], text)), strict=True))
    fusion = {**img, **txt, "attention_mask": enc.attention_mask}
    return {"image_encoder": {"pixel_values": pixels}, "text_encoder": text, "fusion_head": fusion}


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).min())


def timed(fn: Callable[[], object], min_seconds: float, items: int) -> dict[str, float]:
    fn()
    fn()  # warm-up: cuDNN algorithm choice, arena growth
    times = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"median_ms": round(med * 1000, 3), "p99_ms": round(float(np.percentile(times, 99)) * 1000, 3),
            "items_per_s": round(items / med, 1), "reps": len(times)}


def iobinding_call(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], device_id: int) -> Callable[[], None]:
    """A call with inputs already on the GPU and outputs left there (no host copies)."""
    device = "cpu" if DRY_RUN["on"] else "cuda"
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, device_id))
    for out in sess.get_outputs():
        binding.bind_output(out.name, device, device_id)

    def call() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return call


def tensorrt_pipeline(bundle: Path, precision: str, batches: list[int], args: argparse.Namespace,
                      cuda_pipe: ModelPipeline, cpu: dict[str, ort.InferenceSession], result: dict[str, Any]) -> bool:
    """The classify pipeline on TensorRT as the server configures it; False only on a parity failure."""
    entry: dict[str, Any] = {"precision": precision}
    result.setdefault("tensorrt", []).append(entry)
    if TENSORRT not in ort.get_available_providers():
        entry["skipped"] = f"this ONNX Runtime has no {TENSORRT}"
        print(f"{precision} tensorrt: skipped ({entry['skipped']})")
        return True
    settings = Settings(bundle=bundle, providers=f"{TENSORRT},CUDAExecutionProvider", precision=precision,
                        text_cache_size=0, max_client_batch=max(batches), index_path=Path(tempfile.mkdtemp()) / "x",
                        trt_cache_dir=args.out.parent / "trt-cache")
    start = time.perf_counter()
    try:
        pipe = ModelPipeline(bundle, settings)
        pipe.warmup()
    except Exception as exc:  # missing libnvinfer, unsupported graph: report it, the CUDA figures stand
        entry["skipped"] = f"{type(exc).__name__}: {exc}"
        print(f"{precision} tensorrt: could not start ({entry['skipped']})")
        return True
    entry["start_s"] = round(time.perf_counter() - start, 2)
    entry["active_providers"] = pipe.active_providers
    if TENSORRT not in pipe.active_providers:
        entry["skipped"] = f"ONNX Runtime fell back to {pipe.active_providers} (TensorRT libraries missing?)"
        print(f"{precision} tensorrt: {entry['skipped']}")
        return True
    ok = True
    entry["batches"] = []
    for batch in batches:
        pixels = inputs(bundle, batch, cpu)["image_encoder"]["pixel_values"]
        texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
        cos = cosine_min(cuda_pipe.classify(pixels, texts)[0], pipe.classify(pixels, texts)[0])
        passed = cos >= MIN_COSINE[precision]
        ok &= passed
        t = timed(lambda p=pixels, x=texts, m=pipe: m.classify(p, x), args.seconds, batch)
        entry["batches"].append({"batch": batch, "min_cosine_vs_cuda": round(cos, 6), "pass": passed, **t})
        result["parity"].append({"precision": precision, "batch": batch, "graph": "pipeline(tensorrt vs cuda)",
                                 "output": "probabilities", "min_cosine": round(cos, 6), "max_abs_diff": None,
                                 "pass": passed})
        print(f"{precision} tensorrt pipeline batch {batch:3d}: {t['median_ms']:8.3f} ms ({t['items_per_s']:9.1f}/s)"
              f"  cosine vs CUDA {cos:.6f}")
    print(f"{precision} tensorrt: ready in {entry['start_s']} s (engine builds; cached in {settings.trt_cache_dir})")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    DRY_RUN["on"] = args.dry_run_on_cpu
    if args.device_id is not None:
        # The serving pipeline has no device setting (it takes device 0 of what is visible, as the server does),
        # so the choice is made for the whole process before CUDA is initialised. Like CUDA's own ids, N counts
        # within an existing CUDA_VISIBLE_DEVICES (a scheduler's "2,3" with --device-id 1 is GPU 3).
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if visible and not 0 <= args.device_id < len(visible):
            print(f"gpu_check: --device-id {args.device_id} is not among the {len(visible)} visible GPUs "
                  f"(CUDA_VISIBLE_DEVICES={','.join(visible)})", file=sys.stderr)
            return 2
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[args.device_id] if visible else str(args.device_id)
    args.device_id = 0
    bundle = args.bundle
    try:
        manifest = load_bundle_manifest(bundle)
    except BundleError as exc:
        print(f"gpu_check: {exc.message} (pass --bundle DIR; building the default bundle needs the training "
              "extra, e.g. on another machine)", file=sys.stderr)
        return 2
    why = None if DRY_RUN["on"] else cuda_available(bundle / manifest.graphs["fusion_head"].variants["fp32"].file,
                                                    args.device_id)
    if why is not None:
        print(f"gpu_check: no GPU to check: {why}", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    precisions = [p for p in ("fp32", "fp16") if p in manifest.precisions()]
    cpu = {role: session(bundle / spec.variants["fp32"].file, False, 0) for role, spec in manifest.graphs.items()}
    result: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "bundle": str(bundle),
        "onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "cuda_options": CUDA_OPTIONS,
        "precisions": precisions, "parity": [], "graphs": [], "pipeline": [], "dry_run_on_cpu": DRY_RUN["on"],
    }
    try:
        import subprocess

        result["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=10
                                       ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        result["gpu"] = "unknown (nvidia-smi not runnable)"
    print(f"GPU: {result['gpu']}; ONNX Runtime {ort.__version__}; precisions {precisions}")
    ok = True
    for precision in precisions:
        gpu = {role: session(bundle / spec.variants[precision].file, True, args.device_id)  # type: ignore[index]
               for role, spec in manifest.graphs.items()}
        for batch in batches:
            feeds = inputs(bundle, batch, cpu)
            for role, sess in gpu.items():
                ref = cpu[role].run(None, feeds_for(cpu[role], feeds[role]))
                got = sess.run(None, feeds_for(sess, feeds[role]))
                for out, r, g in zip(sess.get_outputs(), ref, got, strict=True):
                    cos = cosine_min(r, g.astype(np.float32))
                    diff = float(np.abs(r - g.astype(np.float32)).max())
                    passed = cos >= MIN_COSINE[precision]
                    ok &= passed
                    result["parity"].append({"precision": precision, "batch": batch, "graph": role,
                                             "output": out.name, "min_cosine": round(cos, 6),
                                             "max_abs_diff": diff, "pass": passed})
                host = timed(lambda s=sess, f=feeds_for(sess, feeds[role]): s.run(None, f), args.seconds, batch)
                dev = timed(iobinding_call(sess, feeds_for(sess, feeds[role]), args.device_id), args.seconds, batch)
                result["graphs"].append({"precision": precision, "batch": batch, "graph": role,
                                         "run_host_io": host, "iobinding_device_io": dev})
                print(f"{precision} {role:13s} batch {batch:3d}: run {host['median_ms']:8.3f} ms "
                      f"({host['items_per_s']:9.1f}/s)  iobinding {dev['median_ms']:8.3f} ms "
                      f"({dev['items_per_s']:9.1f}/s)")
        del gpu
        provider = "CPUExecutionProvider" if DRY_RUN["on"] else "CUDAExecutionProvider"
        pipe = ModelPipeline(bundle, Settings(bundle=bundle, providers=provider, precision=precision,
                                              text_cache_size=0, index_path=Path(tempfile.mkdtemp()) / "unused"))
        for batch in batches:
            feeds = inputs(bundle, batch, cpu)
            texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
            t = timed(lambda p=feeds["image_encoder"]["pixel_values"], x=texts, m=pipe: m.classify(p, x),
                      args.seconds, batch)
            result["pipeline"].append({"precision": precision, "batch": batch, "active_providers":
                                       pipe.active_providers, **t})
            print(f"{precision} pipeline      batch {batch:3d}: {t['median_ms']:8.3f} ms ({t['items_per_s']:9.1f}/s)")
        if not DRY_RUN["on"]:
            ok &= tensorrt_pipeline(bundle, precision, batches, args, pipe, cpu, result)
    failed = [p for p in result["parity"] if not p["pass"]]
    for p in failed:
        print(f"PARITY FAIL {p['precision']} {p['graph']}.{p['output']} batch {p['batch']}: cosine {p['min_cosine']} "
              f"< {MIN_COSINE[p['precision']]}", file=sys.stderr)
    result["parity_ok"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"parity {'ok' if ok else 'FAILED'}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
