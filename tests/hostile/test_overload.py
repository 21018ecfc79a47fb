"""A short run of ``benchmarks/overload.py`` against a real uvicorn process (loopback, ~20 s).

Pins what the service guarantees under ~4x its capacity with a small ``MMFUSION_MAX_QUEUE_SIZE``:
the excess gets ``503`` with ``Retry-After``, no other HTTP status, the time requests spend inside the
server stays bounded (p95 from the server's own latency histogram), the process survives, normal load
right afterwards is served (>= 95 % ``200``; with a queue of 2 a burst may still get a proper 503) with
low latency, and the server's RSS is back within 10 % of where it started.

Client-side latencies are printed but not bounded here: the open-loop load generator shares the 2 CPUs
with the server, so under overload much of its measured time is its own queueing for a free connection.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.errors import OverloadedError
from benchmarks.overload import format_summary, run

# Server-side p95 bound under overload (the histogram's bucket bounds are 0.5, 1, 2.5 s around it).
SERVER_P95_BOUND_MS = 2_500


def test_overload_gets_503_with_retry_after_and_the_server_recovers(tiny_bundle: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert OverloadedError.status_code == 503
    summary = run(tiny_bundle, phase_s=1.5, factor=4.0, normal_factor=0.5, queue_size=2, max_batch=2,
                  capacity_clients=8, max_connections=64, latency_bound_ms=SERVER_P95_BOUND_MS)
    with capsys.disabled():
        print("\n" + format_summary(summary))
    over, normal = summary.phases
    # The generator shares the 2 CPUs with the server: it reaches 2.7-4x; below 2x it is not an overload test.
    assert over.offered_rps > 2.0 * summary.capacity_rps, "the load generator did not reach overload"
    assert over.statuses.get("503", 0) > 0
    assert over.retry_after_on_503 == over.statuses["503"]
    http_statuses = {k for k in over.statuses if not k.startswith("transport_error")}
    assert http_statuses <= {"200", "503"}, over.statuses
    # A refused connection under 4x load on a shared machine is the client's side; allow a trace of it.
    assert sum(over.statuses.values()) - sum(over.statuses[k] for k in http_statuses) <= 0.01 * over.sent
    assert 0 < summary.server_p95_overload_ms <= SERVER_P95_BOUND_MS
    assert normal.latency_ok_ms["p95"] < 1000, normal.latency_ok_ms
    assert not summary.crashed and summary.ready_after
    failed = {name for name, ok in summary.checks.items() if not ok} - {"no other errors under overload"}
    assert not failed, summary.checks
