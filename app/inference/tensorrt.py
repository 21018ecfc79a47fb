"""TensorRT execution provider options: optimisation profiles from the manifest, engine and timing caches.

Opt-in (``MMFUSION_PROVIDERS=TensorrtExecutionProvider,CUDAExecutionProvider``): building a TensorRT
engine takes tens of seconds to minutes per graph, which ``auto`` must not impose on a first start.

Why each option is set:

* **Explicit optimisation profiles** (``trt_profile_{min,opt,max}_shapes``). Without them the provider
  sizes an engine to the first input shapes it sees and *rebuilds* it whenever a later batch or
  sentence is larger: with dynamic batching every new batch size would stall the queue for seconds.
  One profile per graph covers every shape the server can send: batch 1 to the largest a graph call
  may carry, tokens 1 to the manifest's ``max_length``; fixed dimensions come from the manifest.
* **Engine cache** (``trt_engine_cache_*``): a restart loads the built engines in seconds instead of
  rebuilding them. ONNX Runtime names each engine after a hash of its subgraph, profile and GPU, so one
  directory serves every bundle and device without collisions.
* **Timing cache** (``trt_timing_cache_*``): kernel timings are reused across graphs and rebuilds.
* **fp16** (``trt_fp16_enable``) when the server runs the bundle's fp16 variant: TensorRT then picks
  fp16 kernels itself.

Not measured here: the machines this was written on have no GPU (see the README's GPU section and
``benchmarks/gpu_check.py``, which times the provider where one exists).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.bundle.manifest import GraphSpec
from app.core.errors import BundleError

PROVIDER = "TensorrtExecutionProvider"

OPT_BATCH = 8
"""Batch size TensorRT tunes its kernels for (any size in the profile runs): under load the dynamic
batcher's batches are a few rows, and at batch 1 the tuned kernels still run."""

OPT_TOKENS = 16
"""Token count TensorRT tunes for: questions and label prompts are short (the demo's are 8-14 tokens)."""


@dataclass(frozen=True)
class TensorRTConfig:
    cache_dir: Path
    """Engines and timing caches (``MMFUSION_TRT_CACHE_DIR``); must be writable."""
    max_batch: int
    """Largest batch one graph call may carry: the larger of the batcher's ``max_batch_size`` and a
    client batch (``max_client_batch``), which runs alone in one call."""
    max_tokens: int
    """The manifest's ``text.max_length``: no tokenised text is longer."""
    fp16: bool = False
    device_id: int = 0


def _dims(value: int | str, which: str, cfg: TensorRTConfig) -> int:
    if isinstance(value, int):
        return value
    if value == "batch":
        return {"min": 1, "opt": min(OPT_BATCH, cfg.max_batch), "max": cfg.max_batch}[which]
    if value == "sequence":
        return {"min": 1, "opt": min(OPT_TOKENS, cfg.max_tokens), "max": cfg.max_tokens}[which]
    raise BundleError(
        f"cannot build a TensorRT optimisation profile: dimension {value!r} is neither 'batch', 'sequence' nor a "
        "number; re-export the bundle with named batch/sequence axes or use MMFUSION_PROVIDERS=CUDAExecutionProvider"
    )


def profile_shapes(spec: GraphSpec, which: str, cfg: TensorRTConfig) -> str:
    """``name:d0xd1x...`` per input, comma separated (the provider's own profile syntax)."""
    return ",".join(f"{t.name}:" + "x".join(str(_dims(d, which, cfg)) for d in t.shape) for t in spec.inputs)


def tensorrt_options(spec: GraphSpec, cfg: TensorRTConfig) -> dict[str, str]:
    cache = str(cfg.cache_dir)
    return {
        "device_id": str(cfg.device_id),
        "trt_fp16_enable": "True" if cfg.fp16 else "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        "trt_profile_min_shapes": profile_shapes(spec, "min", cfg),
        "trt_profile_opt_shapes": profile_shapes(spec, "opt", cfg),
        "trt_profile_max_shapes": profile_shapes(spec, "max", cfg),
    }


def prepare_cache_dir(cfg: TensorRTConfig) -> None:
    """Fail at start-up, with the setting to change, rather than on the first engine build."""
    try:
        cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cfg.cache_dir / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BundleError(
            f"TensorRT engine cache {cfg.cache_dir} is not writable ({exc.strerror}); set MMFUSION_TRT_CACHE_DIR "
            "to a writable directory (in the Docker image: under the /data volume)"
        ) from None
