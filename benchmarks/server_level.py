"""Server level: closed-loop load over real HTTP, the in-process ceiling, start-up time and memory.

Closed loop: N clients, each sends a request, waits for the answer, sends the next. Throughput
counts the answers that arrive inside the measurement window (after a warm-up); latencies are
those answers' wall-clock times; requests still in flight when the window closes are awaited
(so the next level starts on an idle server) but not counted. Bodies are encoded once up front
(multipart with a real JPEG) and sent by ``benchmarks/load_client.py`` (pre-serialised bytes on
keep-alive connections) so the client spends as little CPU as possible: on a 2-core machine the
load generator shares the CPUs with the server. The driver's CPU time per request is recorded
with every level (``client_cpu_ms_per_request``) so that share is visible.

Only one server may use the CPUs at a time: an "idle" server is not idle (LitServe's processes
poll their queues, ~0.18 of a core here) and eager PyTorch's OpenMP threads slow down many times
over when a core is taken from them. So every server not being measured is suspended
(``ServerProcess.suspend``, SIGSTOP to its whole process tree) and resumed for its own turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.common import REPO_ROOT, cpu_ticks, free_port, percentiles_ms, steal_pct, wait_ready
from benchmarks.load_client import LoadClient

LOAD_CLIENTS = ("raw", "httpx")  # raw: benchmarks/load_client.py (default); httpx: for comparison


@dataclass(frozen=True)
class LoadPlan:
    concurrency: tuple[int, ...]
    warmup_s: float
    duration_s: float
    request_timeout_s: float = 120.0


@dataclass(frozen=True)
class Body:
    """A prebuilt request: POST ``path`` with these bytes and headers."""

    path: str
    content: bytes
    headers: dict[str, str]


def multipart_body(path: str, files: Mapping[str, tuple[str, bytes, str]], data: Mapping[str, str]) -> Body:
    request = httpx.Request("POST", "http://x" + path, files=dict(files), data=dict(data))
    content = request.read()
    return Body(path, content, {"content-type": request.headers["content-type"]})


def top_label(server: ServerProcess, body: Body) -> str | None:
    """The best label a server answers to ``body`` (one request, before any load): the load levels count
    statuses only, so a server answering 200 with a wrong body must be caught here."""
    try:
        r = httpx.post(server.base_url + body.path, content=body.content, headers=body.headers, timeout=60)
        return str(r.json()["predictions"][0]["label"]) if r.status_code == 200 else f"HTTP {r.status_code}"
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        return f"unreadable answer ({type(exc).__name__})"


def json_body(path: str, payload: Mapping[str, Any]) -> Body:
    request = httpx.Request("POST", "http://x" + path, json=dict(payload))
    return Body(path, request.read(), {"content-type": "application/json"})


async def closed_loop(send: Callable[[], Awaitable[int]], concurrency: int, warmup_s: float,
                      duration_s: float, min_completed: int = 8, max_stretch: float = 4.0) -> dict[str, Any]:
    """Run ``concurrency`` clients calling ``send`` (returns an HTTP status) back to back.

    The window is ``duration_s`` after ``warmup_s``, stretched (up to ``max_stretch`` times) until
    ``min_completed`` answers arrived in it: a server answering once every few seconds (eager
    PyTorch on a busy core) would otherwise report 0 req/s from a handful of unlucky seconds.
    """
    start = time.perf_counter()
    t_measure = start + warmup_s
    t_end, t_hard = t_measure + duration_s, t_measure + duration_s * max_stretch
    records: list[tuple[float, float, int | str]] = []
    state = {"in_window": 0, "reached_at": 0.0}

    def deadline() -> float:
        return t_end if state["in_window"] >= min_completed else t_hard

    async def client() -> None:
        while time.perf_counter() < deadline():
            t0 = time.perf_counter()
            try:
                status: int | str = await send()
            except Exception as exc:  # a refused/reset/timed-out request is a result, not a crash
                status = type(exc).__name__
            t1 = time.perf_counter()
            records.append((t0, t1, status))
            if t1 >= t_measure and t1 < t_hard:
                state["in_window"] += 1
                if state["in_window"] == min_completed:
                    state["reached_at"] = t1

    ticks: dict[str, tuple[int, int] | None] = {}

    async def mark_window_start() -> None:
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        ticks["start"] = cpu_ticks()

    await asyncio.gather(mark_window_start(), *(client() for _ in range(concurrency)))
    ticks["end"] = cpu_ticks()  # the last answers drain after the window: a slight overcount at most
    reached = state["reached_at"]
    window_end = t_end if (reached and reached <= t_end) else (reached or t_hard)
    window_s = window_end - t_measure
    window = [(t0, t1, s) for t0, t1, s in records if t_measure <= t1 <= window_end]
    ok = [t1 - t0 for t0, t1, s in window if s == 200]
    errors: dict[str, int] = {}
    for _, _, s in window:
        if s != 200:
            errors[str(s)] = errors.get(str(s), 0) + 1
    return {
        "concurrency": concurrency,
        "completed": len(ok),
        "throughput_rps": round(len(ok) / window_s, 2),
        **percentiles_ms(ok),
        "errors": sum(errors.values()),
        "errors_by_status": errors,
        "window_s": round(window_s, 2),
        "cpu_steal_pct": steal_pct(ticks.get("start"), ticks.get("end")),
    }


@dataclass
class ServerProcess:
    """A server started as a subprocess: time to ready, resident memory of its process tree."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float | None = None
    rss_samples: list[int] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> float:
        t0 = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, env={**os.environ, **self.env}, cwd=REPO_ROOT,
                                         stdout=log, stderr=subprocess.STDOUT)
        if wait_ready(self.proc, self.base_url + self.ready_path, timeout_s):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            self.startup_s = time.perf_counter() - t0
            self.sample_rss()
            return self.startup_s
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s: {self.log_tail()}")

    def sample_rss(self) -> int:
        """Memory of the server and all its children (LitServe runs worker processes): every process's
        own pages (USS) plus the root's shared ones, counted once. Summing RSS counted the pages the
        processes share once per process; PSS would split them with unrelated processes that map the
        same libraries (the benchmark driver itself loads ONNX Runtime and torch)."""
        if self.proc is None:
            return 0
        try:
            root = psutil.Process(self.proc.pid)
            tree = [p for p in (root, *root.children(recursive=True)) if p.is_running()]
            total = sum(_unique(p) for p in tree) + max(0, root.memory_info().rss - _unique(root))
        except psutil.Error:
            return 0
        self.rss_samples.append(total)
        return total

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _tree(self) -> list[psutil.Process]:
        """The server process and all its descendants (LitServe: API server, workers, queue manager)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def suspend(self) -> None:
        """SIGSTOP the whole process tree: a server waiting for its turn takes no CPU from the one measured.

        The parent is stopped first so it cannot start a child that escapes the list. Sockets stay
        open; connections made meanwhile wait in the listen backlog until :meth:`resume`.
        """
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                p.suspend()

    def resume(self) -> None:
        """SIGCONT the whole tree (children first); harmless on a running process."""
        for p in reversed(self._tree()):
            with contextlib.suppress(psutil.Error):
                p.resume()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()  # a stopped process would hold SIGTERM pending until SIGCONT
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for child in children:  # LitServe's workers, if the parent left them behind
            with contextlib.suppress(psutil.Error):
                child.kill()


async def http_levels(server: ServerProcess, body: Body, plan: LoadPlan,
                      concurrency: Sequence[int] | None = None, client: str = "raw") -> list[dict[str, Any]]:
    """Closed-loop levels against ``server``, one connection per client.

    Each level also reports the driver process's CPU time per request sent (warm-up and drain
    included, like the CPU time itself): the share of the 2 cores the load generator took.
    ``client="httpx"`` drives the same load through httpx.AsyncClient, to compare that cost.
    """
    if client not in LOAD_CLIENTS:
        raise ValueError(f"client must be one of {LOAD_CLIENTS}, got {client!r}")
    levels = []
    for c in concurrency or plan.concurrency:
        sent = 0
        if client == "raw":
            lc = LoadClient(server.base_url, c, plan.request_timeout_s)
            raw = lc.prepare("POST", body.path, body.content, body.headers)

            async def send(lc: LoadClient = lc, raw: bytes = raw) -> int:
                nonlocal sent
                sent += 1
                return (await lc.send(raw)).status

            aclose: Callable[[], Awaitable[None]] = lc.aclose
        else:
            limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
            hc = httpx.AsyncClient(base_url=server.base_url, timeout=plan.request_timeout_s, limits=limits)

            async def send(hc: httpx.AsyncClient = hc) -> int:
                nonlocal sent
                sent += 1
                r = await hc.post(body.path, content=body.content, headers=body.headers)
                await r.aread()
                return r.status_code

            aclose = hc.aclose
        cpu0 = time.process_time()
        try:
            level = await closed_loop(send, c, plan.warmup_s, plan.duration_s)
        finally:
            cpu_s = time.process_time() - cpu0
            await aclose()
        level["client"] = client
        level["requests_sent"] = sent
        level["client_cpu_ms_per_request"] = round(cpu_s * 1000 / sent, 3) if sent else None
        level["rss_mb"] = round(server.sample_rss() / 2**20, 1)
        levels.append(level)
    return levels


def _unique(process: psutil.Process) -> int:
    """Unique set size (pages only this process maps), else RSS where the OS does not report it."""
    try:
        return int(process.memory_full_info().uss)
    except (psutil.AccessDenied, NotImplementedError, AttributeError):
        return process.memory_info().rss


def median_window(levels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The window with the median throughput (the lower one of two middles), with the range of every
    window's throughput and p99: one 4-second window decides nothing on a VM that drifts by 10 %."""
    ranked = sorted(levels, key=lambda lv: lv["throughput_rps"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    if len(levels) > 1:
        chosen["windows"] = len(levels)
        chosen["spread_rps"] = [ranked[0]["throughput_rps"], ranked[-1]["throughput_rps"]]
        p99s = sorted(lv["p99_ms"] for lv in levels if lv.get("p99_ms") is not None)
        chosen["spread_p99_ms"] = [p99s[0], p99s[-1]] if p99s else None
    return chosen


def mmfusion_server(bundle: Path, workdir: Path, extra_env: Mapping[str, str]) -> ServerProcess:
    port = free_port()
    env = {"MMFUSION_BUNDLE": str(bundle), "MMFUSION_INDEX_PATH": str(workdir / "index"), **extra_env}
    cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    return ServerProcess("mmfusion", cmd, env, port, "/readyz", workdir / "mmfusion.log")


def naive_server(bundle: Path, run: Path | None, workdir: Path) -> ServerProcess:
    port = free_port()
    env = {"NAIVE_BUNDLE": str(bundle), "NAIVE_RUN": str(run) if run else ""}
    cmd = [sys.executable, "-m", "benchmarks.baselines.naive_torch_server", "--port", str(port)]
    return ServerProcess("naive_torch", cmd, env, port, "/health", workdir / "naive.log")


def litserve_server(bundle: Path, workdir: Path, max_batch_size: int, batch_timeout_s: float, workers: int = 1,
                    text_cache_size: int = 0) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.baselines.litserve_server", "--bundle", str(bundle), "--port", str(port),
           "--max-batch-size", str(max_batch_size), "--batch-timeout", str(batch_timeout_s),
           "--workers", str(workers), "--text-cache-size", str(text_cache_size)]
    return ServerProcess("litserve", cmd, {}, port, "/health", workdir / "litserve.log")


def litserve_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("litserve") is not None


def serving_venv_size(venv: Path) -> dict[str, Any]:
    """Installed size of the serving environment and whether torch is in it (it must not be)."""
    from benchmarks.common import dir_size_bytes

    if not (venv / "bin" / "python").exists():
        return {"path": str(venv), "exists": False, "note": "not built: run `make serving-check` to create it"}
    torch_dirs = list(venv.glob("lib/python*/site-packages/torch"))
    return {"path": str(venv), "exists": True, "size_mb": round(dir_size_bytes(venv) / 2**20, 1),
            "contains_torch": bool(torch_dirs)}


def tempdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="mmfusion-bench-"))
