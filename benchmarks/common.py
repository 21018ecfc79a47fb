"""Shared pieces of the benchmark: timing, statistics, the machine's matmul peak, test inputs.

Every figure the report compares is measured in the same run on the same machine, because this
kind of machine is shared and noisy: a peak or a baseline copied from another run would make the
ratios meaningless. The 1-minute load average is recorded so a noisy run can be recognised.
"""

from __future__ import annotations

import io
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Questions like the demo data's: short, so the text encoder sees ~8-12 tokens per item.
QUESTIONS = (
    "what color is the circle?",
    "how many shapes are in the image?",
    "is there a large triangle?",
    "what shape is the small orange object?",
)
SEARCH_QUERY = "a small blue square on a white background"


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls of one function on a fixed input."""

    seconds: list[float]
    items_per_call: int

    @property
    def median_ms(self) -> float:
        return float(np.median(self.seconds)) * 1000

    @property
    def items_per_s(self) -> float:
        return self.items_per_call / float(np.median(self.seconds))


def percentiles_ms(latencies_s: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 in milliseconds (None when nothing completed)."""
    if not latencies_s:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    arr = np.asarray(latencies_s) * 1000
    return {f"p{q}_ms": round(float(np.percentile(arr, q)), 2) for q in (50, 95, 99)}


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) clock ticks of all CPUs so far, from /proc/stat; None where there is none.

    Steal is the time the hypervisor ran someone else while this VM wanted a CPU: the one part of
    "the machine got slower this minute" a guest can see. Levels report its share of their window.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if fields[:1] != ["cpu"] or len(fields) < 9:
        return None
    ticks = [int(x) for x in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is inside user
    return ticks[7], sum(ticks[:8])


def steal_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share (%) of CPU time stolen by the hypervisor between two :func:`cpu_ticks` readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100 * (after[0] - before[0]) / (after[1] - before[1]), 2)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that decide fp32/int8 speed (AVX2, AVX-512, VNNI, AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    from app.core.config import container_cpus

    load1, load5, _ = os.getloadavg()
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpus_usable": container_cpus(),
        "cpus_host": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "load_avg_1min_at_start": round(load1, 2),
        "load_avg_5min_at_start": round(load5, 2),
    }


def matmul_peak(threads: int, n: int = 2048, reps: int = 3) -> dict[str, float]:
    """fp32 GFLOP/s of an n^3 matrix multiply, numpy (BLAS) and ONNX Runtime MatMul, ``threads`` threads.

    This is the machine's practical fp32 ceiling that the models' achieved GFLOP/s is compared
    with. ONNX Runtime's MatMul runs on exactly ``threads`` intra-op threads (the serving
    setting); numpy uses its BLAS's own thread count, reported as measured.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3
    a @ b  # warm-up: BLAS thread pool start
    numpy_s = min(_once(lambda: a @ b) for _ in range(reps))

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "peak",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {"A": a, "B": b}
    sess.run(None, feeds)
    ort_s = min(_once(lambda: sess.run(None, feeds)) for _ in range(reps))
    numpy_gflops = flops / numpy_s / 1e9
    ort_gflops = flops / ort_s / 1e9
    return {
        "n": n,
        "threads": threads,
        "numpy_gflops": round(numpy_gflops, 1),
        "onnxruntime_gflops": round(ort_gflops, 1),
        "peak_gflops": round(max(numpy_gflops, ort_gflops), 1),
    }


def _once(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def photo_like_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A deterministic JPEG with photo statistics: smooth colour regions, edges, texture and grain.

    A flat or purely random image would make JPEG decoding unrealistically cheap or expensive;
    this one compresses like a photo (roughly 0.5-1.5 bits per pixel at quality 90).
    """
    rng = np.random.default_rng(seed)
    # Low-frequency colour field (sky, walls, objects), upsampled bicubically from a coarse grid.
    coarse = rng.uniform(30, 225, size=(6, 8, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    # Mid-frequency texture (foliage, fabric) and a few hard-edged objects.
    mid = rng.normal(0, 18, size=(max(height // 16, 2), max(width // 16, 2), 3)).astype(np.float32)
    mid_img = Image.fromarray(np.clip(mid + 128, 0, 255).astype(np.uint8)).resize((width, height),
                                                                                 Image.Resampling.BILINEAR)
    img = base + (np.asarray(mid_img, dtype=np.float32) - 128)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(6):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.2) * min(width, height)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 4, size=img.shape).astype(np.float32)  # sensor grain
    out = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def dir_size_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def start_uvicorn(
    env: dict[str, str],
    *,
    extra_args: tuple[str, ...] = (),
    stdout: int = subprocess.PIPE,
    stderr: int = subprocess.STDOUT,
    ready_timeout_s: float = 60.0,
) -> tuple[subprocess.Popen, str]:
    """``uvicorn app.main:app`` on a free loopback port, returned once ``/readyz`` answers 200.

    One starter for the tests and the load scripts, so all of them run the server exactly as users
    do (a real process, a real socket). ``env`` is the whole environment of the child; its start-up
    output is read back (from whichever stream is piped) when it dies before becoming ready.
    """
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", LOOPBACK, "--port", str(port), *extra_args],
        env=env, stdout=stdout, stderr=stderr,
    )
    url = f"http://{LOOPBACK}:{port}"

    def output() -> str:
        stream = proc.stderr if proc.stderr is not None else proc.stdout
        return stream.read().decode()[-2000:] if stream is not None else ""

    if not wait_ready(proc, f"{url}/readyz", ready_timeout_s):
        proc.kill()
        raise RuntimeError(f"server did not become ready in {ready_timeout_s:.0f} s")
    if proc.poll() is not None:
        raise RuntimeError(f"server exited at start: {output()}")
    return proc, url


def wait_ready(proc: subprocess.Popen, ready_url: str, timeout_s: float, poll_s: float = 0.05) -> bool:
    """Poll ``ready_url`` until it answers 200 (True), the process exits (True: the caller checks
    ``proc.poll()``), or ``timeout_s`` passes (False). The one readiness loop of every starter here."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return True
            try:
                if client.get(ready_url).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(poll_s)
    return False
