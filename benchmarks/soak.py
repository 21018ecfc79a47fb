"""Soak: steady mixed load on a real uvicorn process for 10 minutes, memory sampled every second.

A leak of a few KB per request is invisible in a unit test and fatal after a week; over 10 minutes
at a steady rate it shows as a slope. The script drives a closed loop of ``--clients`` clients over
loopback with a mix of classify (image+text), embed (text), search and index writes (replacing a
bounded set of ids, so the index itself does not grow), samples the server's RSS every second and
writes a PNG of RSS over time plus a JSON summary (RSS first/last/max, the fitted slope in MB per
minute over the second half, request counts by status). Not part of CI (it takes 10 minutes):

    python -m benchmarks.soak --bundle models/default --duration-s 600 --out benchmarks/results/soak
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.overload import rss_mb, start_server

ADMIN_KEY = "soak-admin-key-0123456789"


def _jpeg(seed: int) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def requests_mix() -> list[tuple[str, dict[str, Any]]]:
    images = [_jpeg(i) for i in range(4)]
    mix: list[tuple[str, dict[str, Any]]] = []
    for i in range(40):
        kind = i % 4
        if kind == 0:
            mix.append(("/v1/classify", {"image_base64": images[i % 4], "text": f"what color is shape {i}?"}))
        elif kind == 1:
            mix.append(("/v1/embed", {"text": f"a small blue square number {i}"}))
        elif kind == 2:
            mix.append(("/v1/search", {"text": f"a large red circle {i}", "k": 5}))
        else:
            mix.append(("/v1/index/items", {"id": f"soak-{i % 20}", "text": f"item {i}", "metadata": {"i": i}}))
    return mix


async def drive(url: str, clients: int, duration_s: float, pid: int) -> tuple[list[tuple[float, float]], Counter]:
    statuses: Counter = Counter()
    samples: list[tuple[float, float]] = []
    mix = requests_mix()
    t0 = time.perf_counter()
    stop = t0 + duration_s
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}

    async def sampler() -> None:
        while time.perf_counter() < stop:
            samples.append((time.perf_counter() - t0, rss_mb(pid)))
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        async def worker(w: int) -> None:
            n = w
            while time.perf_counter() < stop:
                path, body = mix[n % len(mix)]
                try:
                    r = await client.post(f"{url}{path}", json=body)
                    statuses[str(r.status_code)] += 1
                except httpx.HTTPError:
                    statuses["transport_error"] += 1
                n += clients

        await asyncio.gather(sampler(), *(worker(w) for w in range(clients)))
    samples.append((time.perf_counter() - t0, rss_mb(pid)))
    return samples, statuses


def summarise(samples: list[tuple[float, float]], statuses: Counter, duration_s: float) -> dict[str, Any]:
    t = np.asarray([s[0] for s in samples])
    rss = np.asarray([s[1] for s in samples])
    half = t >= t[-1] / 2
    slope = float(np.polyfit(t[half], rss[half], 1)[0] * 60) if half.sum() >= 2 else 0.0
    total = sum(statuses.values())
    return {"duration_s": duration_s, "requests": total, "req_per_s": total / duration_s,
            "statuses": dict(statuses), "rss_first_mb": float(rss[0]), "rss_last_mb": float(rss[-1]),
            "rss_max_mb": float(rss.max()), "rss_slope_mb_per_min_second_half": slope, "samples": len(samples)}


def plot(samples: list[tuple[float, float]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([s[0] / 60 for s in samples], [s[1] for s in samples], lw=1.5)
    ax.set_xlabel("minutes")
    ax.set_ylabel("server RSS (MB)")
    ax.set_title(f"soak: {summary['requests']} requests ({summary['req_per_s']:.0f}/s), "
                 f"slope {summary['rss_slope_mb_per_min_second_half']:+.2f} MB/min (2nd half)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=Path("models/default"))
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"),
                    help="writes <out>.png (RSS over time) and <out>.json (summary)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmfusion-soak-") as tmp:
        proc, url = start_server(args.bundle, Path(tmp) / "index", {"MMFUSION_ADMIN_KEYS": ADMIN_KEY})
        try:
            samples, statuses = asyncio.run(drive(url, args.clients, args.duration_s, proc.pid))
            crashed = proc.poll() is not None
        finally:
            proc.terminate()
            proc.wait(30)
    summary = {**summarise(samples, statuses, args.duration_s), "crashed": crashed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(samples, summary, args.out.with_suffix(".png"))
    args.out.with_suffix(".json").write_text(json.dumps({**summary, "rss_mb_over_time": samples}, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.json')}")
    ok = not crashed and set(statuses) <= {"200", "201"}
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
