"""mmfusion benchmarks: model level, server level against three alternatives, start-up, memory, search.

    python -m benchmarks.run --quick            # `make bench`: under 5 minutes on 2 cores
    python -m benchmarks.run --full             # `make bench-full`: 4000x3000 photos, 64 clients, 1M vectors
    python -m benchmarks.run --quick --run runs/default   # eager baseline from the run's own checkpoint

What runs, all in one process and one run so the ratios compare like with like:

* fp32 matmul peak (2048^3, numpy and ONNX Runtime MatMul, the benchmark's thread count);
* model level: each graph and the classify pipeline at batch 1/8/32, PyTorch eager vs ONNX Runtime
  fp32 vs the bundle's INT8 variant, with achieved GFLOP/s and % of the peak;
* server level, closed loop over real HTTP with 1/4/16(/64) concurrent clients: classify with a
  640x480 photo-like JPEG (and a 4000x3000 one in full mode), search by text, embed an image, for
  (a) mmfusion (``uvicorn app.main:app`` subprocess), (b) the in-process ceiling (decode_image +
  ModelPipeline from a thread pool, no HTTP), (c) ``benchmarks/baselines/naive_torch_server.py``
  (FastAPI + PyTorch eager, tutorial style), (d) ``benchmarks/baselines/litserve_server.py``
  (LitServe's batching over the same ONNX bundle; needs the ``bench`` extra);
* start-up time to ready and resident memory of every server, the serving venv's installed size;
* exact search latency over 1,000,000 vectors of the bundle's embedding dimension (quick mode: fewer).

Eager weights (``--run``): the training run that produced the bundle (its ``best.pt``), so eager and
ONNX are the same function. Bundles do not ship their run; without ``--run`` (or
``MMFUSION_BENCH_RUN``) the eager model is rebuilt with ``model.build`` from the bundle manifest's
architecture and the encoders' pretrained weights, with a randomly initialised fusion head: the
speed is comparable (encoders are >95% of the FLOPs), the outputs are not; the report says which.

Outputs: a printed table, ``benchmarks/results/bench-<mode>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import gc
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import (
    QUESTIONS,
    REPO_ROOT,
    RESULTS_DIR,
    SEARCH_QUERY,
    machine_info,
    matmul_peak,
    photo_like_jpeg,
)

MODES: dict[str, dict[str, Any]] = {
    # Quick: enough for every acceptance ratio (1 and 16 clients), under 5 minutes on 2 busy cores.
    "quick": {
        "batches": (1, 8, 32), "eager_batches": (1, 8),
        "model_budget": {"min_reps": 5, "min_seconds": 0.6, "max_seconds": 2.5},
        "concurrency": (1, 4, 16), "side_concurrency": (1, 16), "warmup_s": 1.0, "duration_s": 4.0, "repeats": 1,
        "large_image": False, "index_n": 200_000, "index_queries": 30, "index_batches": 3,
    },
    "full": {
        "batches": (1, 8, 32), "eager_batches": (1, 8, 32),
        "model_budget": {"min_reps": 5, "min_seconds": 1.0, "max_seconds": 20.0},
        "concurrency": (1, 4, 16, 64), "side_concurrency": (1, 4, 16, 64), "warmup_s": 3.0, "duration_s": 15.0,
        "repeats": 3, "large_image": True, "index_n": 1_000_000, "index_queries": 200, "index_batches": 20,
    },
}
SERVERS = ("mmfusion", "inprocess", "naive_torch", "litserve")
LITSERVE_DEFAULTS: dict[str, Any] = {"max_batch_size": 8, "batch_timeout_s": 0.001, "workers": 2}
"""LitServe's settings: the highest throughput at 16 clients of a sweep on the 2-core VNNI VM (2026-11-29, text
cache off; req/s and p99 ms at 16 clients): batch 8 / 5 ms / 1 worker (the old setting) 110 at 153; 32 / 1 ms / 1
98 at 251; 16 / 2 ms / 1: 101 at 211; 32 / 5 ms / 1: 102 at 204; 16 / 2 ms / 2 workers: 119 at 223; **8 / 1 ms / 2
workers: 123 at 185**. A timeout of 0 makes LitServe's batching loop poll without waiting (a spinning core)."""
LOAD_CLIENT_TEXT = {
    "raw": "benchmarks/load_client.py (pre-serialised requests, one keep-alive connection per client)",
    "httpx": "httpx.AsyncClient (one keep-alive connection per client)",
}
PARTS = ("model", "server", "index")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from app.core.config import container_cpus

    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="quick mode (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="full mode")
    p.set_defaults(mode="quick")
    p.add_argument("--bundle", type=Path, default=Path("models/default"), help="model bundle (default models/default)")
    p.add_argument("--run", type=Path, default=Path(os.environ["MMFUSION_BENCH_RUN"])
                   if os.environ.get("MMFUSION_BENCH_RUN") else None,
                   help="training run of the bundle (folder with best.pt) for the eager baseline; default "
                   "$MMFUSION_BENCH_RUN, else the run build-default kept next to the bundle "
                   "(models/.default-work/run); without one the eager model is rebuilt from the bundle manifest "
                   "with pretrained encoders and a random fusion head (same speed, different outputs)")
    p.add_argument("--threads", type=int, default=container_cpus(),
                   help="ONNX Runtime intra-op threads = torch threads = matmul-peak threads (default: usable CPUs)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma list of {SERVERS}")
    p.add_argument("--concurrency", default=None, help="override the client counts, e.g. 1,16")
    p.add_argument("--duration", type=float, default=None, help="override the measurement window per level (s)")
    p.add_argument("--repeats", type=int, default=None,
                   help="classify windows per server and client count, interleaved; each level reports the median "
                   "window by throughput and the spread of all (default: 1 quick, 3 full)")
    p.add_argument("--warmup", type=float, default=None, help="override the warm-up per level (s)")
    p.add_argument("--batches", default=None, help="override the model-level batch sizes, e.g. 1,8")
    p.add_argument("--eager-batches", default=None, help="override the batch sizes eager PyTorch is timed at")
    p.add_argument("--model-seconds", type=float, default=None, help="override the max seconds per model-level cell")
    p.add_argument("--index-n", type=int, default=None, help="override the number of indexed vectors")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the mmfusion server, e.g. MMFUSION_MAX_BATCH_SIZE=8 (repeatable)")
    p.add_argument("--load-client", choices=("raw", "httpx"), default="raw",
                   help="HTTP load generator: raw = benchmarks/load_client.py (default, least client CPU per "
                   "request), httpx = httpx.AsyncClient (for comparing the client's cost)")
    p.add_argument("--litserve-max-batch-size", type=int, default=LITSERVE_DEFAULTS["max_batch_size"])
    p.add_argument("--litserve-batch-timeout", type=float, default=LITSERVE_DEFAULTS["batch_timeout_s"],
                   help="seconds (0 makes LitServe's batching loop poll its queue without waiting: it spins)")
    p.add_argument("--litserve-workers", type=int, default=LITSERVE_DEFAULTS["workers"],
                   help="LitServe workers per device; with more than one each gets its share of the CPUs")
    p.add_argument("--text-cache-size", type=int, default=0,
                   help="text-encoder cache of every server built on the pipeline (mmfusion, in-process, LitServe); "
                   "default 0: every request sends the same question, so with a cache the text encoder would run "
                   "once per run and the naive server (no cache) would be the only one paying for it")
    p.add_argument("--serve-venv", type=Path, default=Path(".venv-serve"), help="serving venv whose size is reported")
    p.add_argument("--peak-n", type=int, default=2048, help="matrix size of the matmul-peak measurement")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default=None, help="output name bench-<tag>.* (default: the mode)")
    args = p.parse_args(argv)
    if args.run is None:
        args.run = default_run(args.bundle)
    return args


def default_run(bundle: Path) -> Path | None:
    """The training run ``mmfusion build-default`` keeps beside the bundle (``.<name>-work/run``), if it is
    there: then ``make bench`` times eager PyTorch with the bundle's very weights, not a random head."""
    run = bundle.parent / f".{bundle.name}-work" / "run"
    return run if (run / "best.pt").is_file() else None


def _ints(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip()) if text else default


def log(msg: str) -> None:
    print(msg, flush=True)


def bundle_info(bundle: Path) -> dict[str, Any]:
    from app.bundle.verify import load_bundle_manifest

    m = load_bundle_manifest(bundle)
    q = m.quality.get("int8") if m.quality else None  # type: ignore[call-overload]
    return {"path": str(bundle), "name": m.name, "version": m.version, "embedding_dim": m.embedding_dim,
            "precisions": m.precisions(), "model": m.model.model_dump() if m.model else None,
            "int8_quality": q.model_dump() if q is not None else None}


def run_model(args: argparse.Namespace, cfg: dict[str, Any], peak: float) -> dict[str, Any]:
    from benchmarks.model_level import TimingBudget, run_model_level

    eager = None
    try:
        from benchmarks.eager import load_eager

        eager = load_eager(args.bundle, args.run)
    except ImportError as exc:  # serving-only install: no torch, so no eager rows
        log(f"  no PyTorch eager baseline ({exc}); install the train extra")
    budget = dict(cfg["model_budget"])
    if args.model_seconds is not None:
        budget["max_seconds"] = args.model_seconds
        budget["min_seconds"] = min(budget["min_seconds"], args.model_seconds)
    out = run_model_level(args.bundle, eager, threads=args.threads, batches=_ints(args.batches, cfg["batches"]),
                          eager_batches=_ints(args.eager_batches, cfg["eager_batches"]), peak_gflops=peak,
                          budget=TimingBudget(**budget), log=log)
    del eager
    gc.collect()
    return out


async def run_servers(args: argparse.Namespace, cfg: dict[str, Any], servers: list[str]) -> dict[str, Any]:
    """All servers up at once, measured in turn at each client count, the idle ones suspended.

    Interleaving by level (mmfusion, in-process, naive, LitServe at 1 client, then all at 4, ...)
    rather than server by server keeps the ratios at one client count from being skewed by the
    load of other jobs drifting over the minutes a run takes on a shared machine. Only one server
    is ever running at a time: every other one is SIGSTOPped (``ServerProcess.suspend``), from
    right after its own start-up was timed until its turn, and during the in-process ceiling,
    because an idle server is not idle (LitServe polls its queues) and eager PyTorch loses many
    times its speed when a core is taken from it.
    """
    from app.inference.batched import BatchedPipeline
    from app.inference.pipeline import ModelPipeline
    from app.main import batching_config
    from app.preprocessing.image import decode_image
    from benchmarks import server_level as sl

    plan = sl.LoadPlan(_ints(args.concurrency, cfg["concurrency"]),
                       args.warmup if args.warmup is not None else cfg["warmup_s"],
                       args.duration if args.duration is not None else cfg["duration_s"])
    side = tuple(c for c in _ints(args.concurrency, cfg["side_concurrency"]) if c in plan.concurrency) or (
        plan.concurrency[0],)
    images = {"640x480": photo_like_jpeg(640, 480, seed=1)}
    if cfg["large_image"]:
        images["4000x3000"] = photo_like_jpeg(4000, 3000, seed=2)
    text = QUESTIONS[0]
    workloads: dict[str, dict[str, list[dict[str, Any]]]] = {f"classify_{k}": {} for k in images}
    startup: dict[str, float] = {}
    notes: list[str] = []
    workdir = sl.tempdir()
    repeats = max(1, args.repeats if args.repeats is not None else cfg["repeats"])

    def multipart(path: str, jpeg: bytes, with_text: bool = True) -> sl.Body:
        return sl.multipart_body(path, {"image": ("photo.jpg", jpeg, "image/jpeg")},
                                 {"text": text} if with_text else {})

    # (server, classify body per image) for the HTTP servers.
    procs: dict[str, sl.ServerProcess] = {}
    bodies: dict[str, dict[str, sl.Body]] = {}
    env_pairs = {"MMFUSION_TEXT_CACHE_SIZE": str(args.text_cache_size),
                 **dict(kv.split("=", 1) for kv in args.server_env)}
    if "mmfusion" in servers:
        procs["mmfusion"] = sl.mmfusion_server(args.bundle, workdir, env_pairs)
        bodies["mmfusion"] = {k: multipart("/v1/classify", v) for k, v in images.items()}
    if "naive_torch" in servers:
        procs["naive_torch"] = sl.naive_server(args.bundle, args.run, workdir)
        bodies["naive_torch"] = {k: multipart("/classify", v) for k, v in images.items()}
    if "litserve" in servers:
        if sl.litserve_available():
            procs["litserve"] = sl.litserve_server(args.bundle, workdir, args.litserve_max_batch_size,
                                                   args.litserve_batch_timeout, args.litserve_workers,
                                                   args.text_cache_size)
            bodies["litserve"] = {k: sl.json_body("/v1/classify", {"image": base64.b64encode(v).decode(),
                                                                  "text": text}) for k, v in images.items()}
        else:
            notes.append("litserve not installed: install the bench extra (pip install -c constraints.txt '.[bench]')")
    idle_rss: dict[str, int] = {}
    answers: dict[str, str | None] = {}
    try:
        for name, proc in list(procs.items()):
            log(f"  {name}: starting")
            try:  # start-up is timed one server at a time, with the others suspended
                startup[name] = round(proc.start(), 3)
                idle_rss[name] = proc.sample_rss()
                answers[name] = sl.top_label(proc, bodies[name][next(iter(images))])
                proc.suspend()
            except Exception as exc:  # one failing baseline must not lose the others' figures
                notes.append(f"{name} failed to start: {type(exc).__name__}: {exc}"[:1500])
                log(f"  {name} FAILED to start: {exc}")
                proc.stop()
                del procs[name]
        pipe = None
        if "inprocess" in servers:
            # The ceiling is the server's own request path without HTTP: the same thread split, the same
            # batching queues and decode pool. Calling pipe.classify from one thread per client instead
            # oversubscribes the cores and measures that, not what HTTP costs.
            log("  inprocess: loading the pipeline")
            settings = server_settings(env_pairs, bundle=args.bundle, index_path=workdir / "inprocess-index")
            pipe = ModelPipeline(args.bundle, settings, split_threads=True)
            pipe.warmup()
            first = decode_image(next(iter(images.values())), pipe.manifest.image,
                                 max_pixels=settings.max_image_pixels)
            answers["inprocess"] = pipe.manifest.labels[int(pipe.classify(first[None], [text])[0][0].argmax())]
            batched = BatchedPipeline(pipe, batching_config(settings),
                                      image_instances=settings.image_encoder_instances)
            decode_pool = ThreadPoolExecutor(settings.resolved_decode_threads(), thread_name_prefix="decode")

        windows: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        for key, jpeg in [(k, v) for _ in range(repeats) for k, v in images.items()]:
            workload = f"classify_{key}"
            for c in plan.concurrency:
                log(f"  {workload} at {c} clients: " + ", ".join(
                    [*(n for n in procs if n == "mmfusion"), *(["inprocess"] if pipe else []),
                     *(n for n in procs if n != "mmfusion")]))
                for name in ("mmfusion", "inprocess", "naive_torch", "litserve"):
                    if name == "inprocess" and pipe is not None:

                        async def send(jpeg: bytes = jpeg, pipe: ModelPipeline = pipe) -> int:
                            pixels = await asyncio.get_running_loop().run_in_executor(
                                decode_pool, functools.partial(decode_image, jpeg, pipe.manifest.image,
                                                               max_pixels=settings.max_image_pixels))
                            await batched.classify(pixels[None], [text])
                            return 200

                        level = await sl.closed_loop(send, c, plan.warmup_s, plan.duration_s)
                    elif name in procs:
                        procs[name].resume()
                        try:
                            level = (await sl.http_levels(procs[name], bodies[name][key], plan, (c,),
                                                          args.load_client))[0]
                        except Exception as exc:
                            notes.append(f"{name} failed at {c} clients: {type(exc).__name__}: {exc}"[:1500])
                            continue
                        finally:
                            procs[name].suspend()
                    else:
                        continue
                    windows.setdefault((workload, name, c), []).append(level)
        for (workload, name, _), levels in windows.items():  # in insertion order: concurrency ascending
            workloads[workload].setdefault(name, []).append(sl.median_window(levels))
        if repeats > 1:
            notes.append(f"{repeats} interleaved windows per server and client count; each row is the median window by "
                         "throughput, `spread_rps` / `spread_p99_ms` in the JSON hold the range of all of them")
        if pipe is not None:
            await batched.aclose()
            decode_pool.shutdown(wait=True)
            del pipe, batched
            gc.collect()
        if "mmfusion" in procs:
            procs["mmfusion"].resume()
            for workload, body in (
                ("search_text", sl.json_body("/v1/search", {"text": SEARCH_QUERY, "k": 10})),
                ("embed_image_640x480", multipart("/v1/embed", images["640x480"], with_text=False)),
            ):
                log(f"  mmfusion: {workload} at {side} clients")
                workloads[workload] = {"mmfusion": await sl.http_levels(procs["mmfusion"], body, plan, side,
                                                                        args.load_client)}
    finally:
        for proc in procs.values():
            proc.resume()
        for proc in procs.values():
            proc.stop()
    rss = {name: {"idle": round(idle_rss[name] / 2**20, 1), "peak": round(max(p.rss_samples) / 2**20, 1)}
           for name, p in procs.items() if name in idle_rss}
    idle = "idle servers suspended (SIGSTOP) while another is measured, started and timed one at a time"
    client_cpu = [lv["client_cpu_ms_per_request"] for by_server in workloads.values() for levels in by_server.values()
                  for lv in levels if lv.get("client_cpu_ms_per_request") is not None]
    same_model = {n: a for n, a in answers.items() if n != "naive_torch" or args.run is not None}
    if len(set(same_model.values())) > 1:
        notes.append(f"WARNING: the servers answer the first request differently ({answers}): the load levels count "
                     "HTTP statuses only")
    elif answers:
        label = next(iter(same_model.values()), None)
        notes.append(f"every server answers the first request with the same top label ({label!r})"
                     + ("" if args.run is not None else "; naive_torch not compared: a random head without --run"))
    if procs:
        notes.append(f"{idle}: an idle LitServe polls at ~0.2 of a core and eager PyTorch's OpenMP threads slow down "
                     "many times over when a core is taken, so no server pays for another one")
    if client_cpu:
        notes.append(f"load generator: {LOAD_CLIENT_TEXT[args.load_client]} in the driver process on the same CPUs, "
                     f"{min(client_cpu)}-{max(client_cpu)} ms of client CPU per request (client_cpu_ms_per_request "
                     "per level); the in-process ceiling pays none of it")
    server = {
        "plan": {"concurrency": list(plan.concurrency), "side_concurrency": list(side), "warmup_s": plan.warmup_s,
                 "duration_s": plan.duration_s, "repeats": repeats,
                 "order": "interleaved by client count, one server loaded at a time",
                 "idle_servers": idle, "load_client": LOAD_CLIENT_TEXT[args.load_client]},
        "images": {k: len(v) for k, v in images.items()},
        "mmfusion_env": env_pairs,
        "mmfusion_settings": effective_settings(env_pairs),
        "litserve": {"max_batch_size": args.litserve_max_batch_size, "batch_timeout_s": args.litserve_batch_timeout,
                     "workers": args.litserve_workers,
                     "body": "JSON with base64 image (LitServe cannot pickle a multipart upload into its queue)"},
        "text_cache_size": args.text_cache_size,
        "answers": answers,
        "inprocess": "the server's BatchedPipeline and decode pool, called without HTTP",
        "workloads": workloads,
        "startup_s": startup,
        "rss_mb": rss,
        "notes": notes,
    }
    from benchmarks.report import server_ratios

    server["ratios"] = server_ratios(server)
    return server


OVERLOAD_RESULTS = ("overload-shipped-queue.json", "overload.json")
"""Where ``benchmarks/overload.py --json`` results are looked for, best first (README, Overload)."""


def server_settings(env_pairs: dict[str, str], **overrides: Any) -> Any:
    """The mmfusion server's Settings: its defaults plus what the benchmark passes it (--server-env and
    the text cache size), so that the in-process ceiling runs with the very same ones."""
    from app.core.config import Settings

    kwargs = {k.removeprefix("MMFUSION_").lower(): v for k, v in env_pairs.items() if k.startswith("MMFUSION_")}
    return Settings(**{**kwargs, **overrides})


def effective_settings(env_pairs: dict[str, str]) -> dict[str, Any]:
    """The performance settings the mmfusion server ran with (its defaults plus --server-env)."""
    fields = ("precision", "intra_op_threads", "decode_threads", "max_batch_size", "max_queue_delay_ms",
              "max_queue_size", "text_cache_size", "image_encoder_instances", "log_level")
    settings = server_settings(env_pairs)
    out = {f: getattr(settings, f, None) for f in fields}
    out["resolved_intra_op_threads"] = settings.resolved_intra_op_threads()
    return out


def run_index(args: argparse.Namespace, cfg: dict[str, Any], dim: int) -> dict[str, Any]:
    """Exact search over N vectors of the bundle's dimension, via benchmarks/index_search.py."""
    import tempfile

    from benchmarks import index_search

    n = args.index_n or cfg["index_n"]
    out = Path(tempfile.mkdtemp(prefix="mmfusion-bench-index-")) / "index.json"
    r = index_search.main(["--n", str(n), "--dim", str(dim), "--queries", str(cfg["index_queries"]),
                           "--batches", str(cfg["index_batches"]), "--kernel-runs", "0", "--check", "2",
                           "--out", str(out)])
    note = "" if n >= 1_000_000 else f"{n:,} vectors, not 1,000,000 (reduced for this mode)"
    return {"n": n, "dim": dim, "k": r["params"]["k"], "add_s": r["add"]["seconds"],
            "batch_1": r["search_batch_1"], "batch_32": r["search_batch_32"], "exactness": r["exactness"],
            "note": note}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.report import acceptance, markdown, plot

    args = parse_args(argv)
    cfg = MODES[args.mode]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS)) + sorted(set(servers) - set(SERVERS))
    if unknown:
        raise SystemExit(f"unknown parts/servers {unknown}")
    t_start = time.perf_counter()
    tag = args.tag or args.mode
    result: dict[str, Any] = {
        "benchmark": "mmfusion",
        "mode": args.mode,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "params": {"threads": args.threads, "run": str(args.run) if args.run else None, "parts": parts,
                   "servers": servers, "argv": sys.argv[1:] if argv is None else argv},
        "bundle": bundle_info(args.bundle),
        "notes": [],
    }
    if args.mode == "quick":
        result["notes"].append(
            "quick mode: 1/4/16 clients (no 64), 640x480 JPEG only (no 4000x3000), search/embed at 1 and 16 "
            "clients, eager PyTorch timed at batch 1 and 8 only (batch 32 takes seconds per call), "
            f"{MODES['quick']['index_n']:,} indexed vectors instead of 1,000,000; `--full` does all of it")
    log(f"mmfusion benchmark, {args.mode} mode, {args.threads} threads, load average "
        f"{result['machine']['load_avg_1min_at_start']}")
    log("matmul peak ...")
    result["matmul_peak"] = matmul_peak(args.threads, n=args.peak_n)
    if "model" in parts:
        log("model level ...")
        result["model_level"] = run_model(args, cfg, result["matmul_peak"]["peak_gflops"])
    if "server" in parts and servers:
        log("server level ...")
        result["server_level"] = asyncio.run(run_servers(args, cfg, servers))
        result["notes"] += result["server_level"]["notes"]
    if "server" in parts:
        from benchmarks.server_level import serving_venv_size

        result["serving_venv"] = serving_venv_size(args.serve_venv)
    if "index" in parts:
        log("vector search ...")
        result["index_search"] = run_index(args, cfg, result["bundle"]["embedding_dim"])
    # The peak is the machine's ceiling: measured again at the end and the higher one kept, so a
    # load spike during the first measurement cannot push the models past "100 % of peak".
    again = matmul_peak(args.threads, n=args.peak_n)
    peak = result["matmul_peak"]
    peak["runs"] = [dict(peak), again]
    peak["peak_gflops"] = max(peak["peak_gflops"], again["peak_gflops"])
    peak["numpy_gflops"] = max(peak["numpy_gflops"], again["numpy_gflops"])
    peak["onnxruntime_gflops"] = max(peak["onnxruntime_gflops"], again["onnxruntime_gflops"])
    for row in result.get("model_level", {}).get("rows", []):
        if row["gflops"] is not None:
            row["pct_of_peak"] = float(f"{100 * row['gflops'] / peak['peak_gflops']:.4g}")
    if "model_level" in result:
        variants = result["model_level"]["int8_variants"]
        same = [r for r in result["model_level"]["ratios"]
                if r["int8_vs_fp32"] is not None and "the fp32 file" in variants.get(r["target"], "")]
        if same:
            spread = [r["int8_vs_fp32"] for r in same]
            result["notes"].append(
                "noise gauge: graphs whose int8 variant is the fp32 file itself measured INT8/fp32 median ratios "
                f"of {min(spread)}-{max(spread)}x (ideally 1.0) in this run")
    steal = [lv["cpu_steal_pct"] for by_server in result.get("server_level", {}).get("workloads", {}).values()
             for levels in by_server.values() for lv in levels if lv.get("cpu_steal_pct") is not None]
    if steal:
        result["notes"].append(
            f"noise gauge: the hypervisor stole {min(steal)}-{max(steal)} % of the CPU time in the server-level "
            "windows (/proc/stat steal; column CPU steal %)")
    result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    if result["machine"]["load_avg_1min_at_start"] > 0.5 * result["machine"]["cpus_usable"]:
        result["notes"].append(
            f"the machine was busy (1-min load {result['machine']['load_avg_1min_at_start']} on "
            f"{result['machine']['cpus_usable']} CPUs): multi-threaded eager PyTorch (OpenMP spin barriers) "
            "slows down far more than ONNX Runtime when a core is taken, so eager ratios can be inflated")
    # benchmarks/overload.py's own result (another script, another run): with the shipped settings if present
    overload = next((f for f in (args.out_dir / n for n in OVERLOAD_RESULTS) if f.is_file()), None)
    if overload is not None:
        try:
            saved = json.loads(overload.read_text())
            passed = saved.get("issue_acceptance", saved.get("passed"))
        except (OSError, ValueError):
            passed = None
        result["overload_separate_run"] = {
            "file": str(overload.relative_to(REPO_ROOT) if overload.is_relative_to(REPO_ROOT) else overload),
            "passed": passed,
            "when": datetime.fromtimestamp(overload.stat().st_mtime, UTC).isoformat(timespec="seconds")}
    result["acceptance"] = acceptance(result)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    png = plot(result, args.out_dir / f"bench-{tag}.png")
    result["plot"] = str(png) if png else None
    tmp = args.out_dir / f"bench-{tag}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out_dir / f"bench-{tag}.json")
    (args.out_dir / f"bench-{tag}.md").write_text(md)
    print("\n" + md)
    log(f"wrote {args.out_dir / f'bench-{tag}.json'}, .md{', .png' if png else ''} in {result['elapsed_s']} s")
    return result


if __name__ == "__main__":
    main()
