"""Benchmark of the embedded vector index (app.index) at serving scale.

Builds ``--n`` random vectors of ``--dim`` (default 1,000,000 x 384), bulk-adds them, times exact
top-k search at batch 1 and batch 32 (median / p99), checks a few results against a numpy
brute force, and compares the two search kernels the index chooses between. Optionally
(``--persist``) times writing the snapshot and reopening the index from disk.

Prints a Markdown table and writes JSON to ``benchmarks/results/index_search.json``.

    python benchmarks/index_search.py                      # 1M x 384, ~2-3 minutes on 2 cores
    python benchmarks/index_search.py --n 100000 --persist # quick run with persistence timings
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import faiss  # noqa: E402

from app.index import BACKEND, VectorIndex, exact_top_k  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "index_search.json"
CHUNK = 100_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="number of indexed vectors")
    p.add_argument("--dim", type=int, default=384, help="vector dimension")
    p.add_argument("--queries", type=int, default=100, help="single queries to time (batch 1)")
    p.add_argument("--batches", type=int, default=20, help="batches of 32 queries to time")
    p.add_argument("--k", type=int, default=10, help="top-k")
    p.add_argument("--check", type=int, default=5, help="queries checked against numpy brute force")
    p.add_argument("--kernel-runs", type=int, default=5, help="runs per kernel in the kernel comparison (0: skip)")
    p.add_argument("--persist", action="store_true", help="also time compaction (snapshot write) and reopen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def timed(fn: Callable[[], Any], runs: int) -> list[float]:
    """Wall-clock milliseconds of ``runs`` calls."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def summary(ms: list[float]) -> dict[str, float]:
    arr = np.asarray(ms)
    return {
        "runs": len(ms),
        "median_ms": round(float(np.median(arr)), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
        "min_ms": round(float(arr.min()), 2),
    }


def random_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Gaussian rows (not normalised: the index normalises, which is part of what add costs)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        out[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    return out


def brute_force_top_k(raw: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k in float64, streaming over the base so memory stays small."""
    q = queries.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = np.empty((len(q), raw.shape[0]), dtype=np.float64)
    for start in range(0, raw.shape[0], CHUNK):
        block = raw[start : start + CHUNK].astype(np.float64)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        scores[:, start : start + block.shape[0]] = q @ block.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(scores, top, axis=1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    n, dim, k = args.n, args.dim, args.k
    result: dict[str, Any] = {
        "benchmark": "index_search",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {k_: (str(v) if isinstance(v, Path) else v) for k_, v in vars(args).items()},
        "environment": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "faiss": faiss.__version__,
            "faiss_omp_threads": faiss.omp_get_max_threads(),
            "backend": BACKEND,
        },
    }
    print(f"generating {n:,} x {dim} vectors ...", flush=True)
    t0 = time.perf_counter()
    raw = random_vectors(n, dim, args.seed)
    ids = [f"item-{i}" for i in range(n)]
    result["generate_s"] = round(time.perf_counter() - t0, 2)

    index = VectorIndex.in_memory(dim)
    print("adding (bulk, add_batch in chunks of 100k) ...", flush=True)
    t0 = time.perf_counter()
    for start in range(0, n, CHUNK):
        index.add_batch(ids[start : start + CHUNK], raw[start : start + CHUNK])
    add_s = time.perf_counter() - t0
    assert index.count == n
    result["add"] = {"seconds": round(add_s, 2), "items_per_s": round(n / add_s)}

    rng = np.random.default_rng(args.seed + 1)
    queries = rng.standard_normal((max(args.queries, 32 * args.batches, args.check, 32), dim)).astype(np.float32)
    index.search(queries[:1], k=k)  # warm-up: page in, BLAS thread pools, faiss configuration
    index.search(queries[:32], k=k)

    print(f"searching: {args.queries} single queries, {args.batches} batches of 32 ...", flush=True)
    single = [timed(lambda q=q: index.search(q, k=k), 1)[0] for q in queries[: args.queries]]
    batch = [timed(lambda b=b: index.search(queries[32 * b : 32 * b + 32], k=k), 1)[0] for b in range(args.batches)]
    result["search_batch_1"] = summary(single)
    result["search_batch_32"] = summary(batch)
    result["search_batch_32"]["per_query_median_ms"] = round(result["search_batch_32"]["median_ms"] / 32, 2)
    result["search_batch_32"]["queries_per_s"] = round(32 * 1000 / result["search_batch_32"]["median_ms"], 1)

    print(f"checking {args.check} queries against a numpy brute force ...", flush=True)
    check_q = queries[: args.check]
    ref_rows, ref_scores = brute_force_top_k(raw, check_q, k)
    got = index.search(check_q, k=k)
    mismatches = 0
    max_score_err = 0.0
    for qi, hits in enumerate(got):
        if [h.id for h in hits] != [ids[r] for r in ref_rows[qi]]:
            mismatches += 1
        max_score_err = max(max_score_err, float(np.abs(np.array([h.score for h in hits]) - ref_scores[qi]).max()))
    got_single = [index.search(q, k=k)[0] for q in check_q]
    mismatches += sum([h.id for h in hits] != [ids[r] for r in ref_rows[qi]] for qi, hits in enumerate(got_single))
    result["exactness"] = {
        "queries_checked": 2 * args.check,
        "top_k_id_mismatches": mismatches,
        "max_abs_score_error": max_score_err,
    }

    if args.kernel_runs:
        print("comparing search kernels ...", flush=True)
        base = index._vectors[:n]  # the contiguous matrix the index searches (read-only use)
        q1, q32 = np.ascontiguousarray(queries[:1]), np.ascontiguousarray(queries[:32])
        q1 /= np.linalg.norm(q1, axis=1, keepdims=True)
        q32 /= np.linalg.norm(q32, axis=1, keepdims=True)
        runs = args.kernel_runs
        kernels: dict[str, dict[str, float]] = {}
        kernels["batch1_numpy_gemv_argpartition (used)"] = summary(timed(lambda: exact_top_k(q1, base, k), runs))
        kernels["batch1_faiss_knn"] = summary(
            timed(lambda: faiss.knn(q1, base, k, metric=faiss.METRIC_INNER_PRODUCT), runs)
        )
        kernels["batch32_faiss_knn_blas (used)"] = summary(timed(lambda: exact_top_k(q32, base, k), runs))
        saved = faiss.cvar.distance_compute_blas_threshold
        try:
            faiss.cvar.distance_compute_blas_threshold = 128_000  # faiss 1.15 default: per-query SIMD loop
            kernels["batch32_faiss_knn_default_threshold"] = summary(
                timed(lambda: faiss.knn(q32, base, k, metric=faiss.METRIC_INNER_PRODUCT), runs)
            )
        finally:
            faiss.cvar.distance_compute_blas_threshold = saved

        def numpy_batch() -> None:
            scores = q32 @ base.T
            np.argpartition(scores, -k, axis=1)[:, -k:]

        kernels["batch32_numpy_gemm_argpartition"] = summary(timed(numpy_batch, runs))
        result["kernels"] = kernels

    if args.persist:
        print("persisting: snapshot write + reopen ...", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix="mmfusion-index-bench-"))
        try:
            disk = VectorIndex.open(tmp / "idx", bundle_name="bench", bundle_version="0", dim=dim, durable=False)
            t0 = time.perf_counter()
            for start in range(0, n, CHUNK):
                disk.add_batch(ids[start : start + CHUNK], raw[start : start + CHUNK])
            wal_add_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            disk.close()
            close_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            reopened = VectorIndex.open(tmp / "idx", bundle_name="bench", bundle_version="0", dim=dim)
            open_s = time.perf_counter() - t0
            assert reopened.count == n
            reopened.close()
            result["persistence"] = {
                "add_with_wal_s": round(wal_add_s, 2),
                "close_compact_s": round(close_s, 2),
                "reopen_from_snapshot_s": round(open_s, 2),
                "snapshot_bytes": (tmp / "idx" / "snapshot.bin").stat().st_size,
            }
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"\nwrote {args.out}")
    return result


def print_table(r: dict[str, Any]) -> None:
    p = r["params"]
    print(f"\n### Vector index: {p['n']:,} x {p['dim']} float32, top-{p['k']}, {r['environment']['cpus']} CPUs\n")
    print("| measurement | median | p99 | notes |")
    print("|---|---:|---:|---|")
    add = r["add"]
    print(f"| bulk add ({p['n']:,} items) | {add['seconds']} s | | {add['items_per_s']:,} items/s |")
    s1, s32 = r["search_batch_1"], r["search_batch_32"]
    print(f"| search, batch 1 | {s1['median_ms']} ms | {s1['p99_ms']} ms | {s1['runs']} queries |")
    print(
        f"| search, batch 32 | {s32['median_ms']} ms | {s32['p99_ms']} ms | "
        f"{s32['per_query_median_ms']} ms/query, {s32['queries_per_s']} queries/s |"
    )
    ex = r["exactness"]
    print(
        f"| exactness vs numpy | {ex['top_k_id_mismatches']} mismatches | | "
        f"{ex['queries_checked']} queries, max score error {ex['max_abs_score_error']:.1e} |"
    )
    for name, s in r.get("kernels", {}).items():
        print(f"| kernel: {name} | {s['median_ms']} ms | {s['p99_ms']} ms | {s['runs']} runs |")
    if "persistence" in r:
        ps = r["persistence"]
        print(f"| add with WAL (durable=False) | {ps['add_with_wal_s']} s | | |")
        print(f"| close = compact (snapshot write) | {ps['close_compact_s']} s | | {ps['snapshot_bytes']:,} bytes |")
        print(f"| reopen from snapshot | {ps['reopen_from_snapshot_s']} s | | |")


if __name__ == "__main__":
    main()
