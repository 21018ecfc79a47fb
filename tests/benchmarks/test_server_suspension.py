"""Idle servers are suspended while another is measured: the whole process tree stops and resumes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.server_level import ServerProcess

# A parent that starts a child (as LitServe starts its workers), both looping on the CPU.
TREE = ("import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
        "while True: time.sleep(0.01)\n")


def _wait_children(proc: psutil.Process, n: int, timeout: float = 10.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = proc.children(recursive=True)
        if len(children) >= n:
            return children
        time.sleep(0.02)
    raise AssertionError("the child process did not start")


def _until(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    """Signals are delivered asynchronously: poll the process state for a moment."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_suspend_stops_the_whole_tree_resume_restarts_it_and_stop_works_while_suspended(tmp_path: Path) -> None:
    server = ServerProcess("tree", [], {}, 0, "/", tmp_path / "log")
    server.proc = subprocess.Popen([sys.executable, "-c", TREE])
    root = psutil.Process(server.proc.pid)
    try:
        tree = [root, *_wait_children(root, 1)]
        server.suspend()
        assert _until(lambda: all(p.status() == psutil.STATUS_STOPPED for p in tree))
        busy = tree[1].cpu_times().user
        time.sleep(0.3)
        assert tree[1].cpu_times().user == busy  # a stopped process takes no CPU
        server.resume()
        server.resume()  # harmless on a running tree
        assert _until(lambda: all(p.status() != psutil.STATUS_STOPPED for p in tree))
        time.sleep(0.3)
        assert tree[1].cpu_times().user > busy
        server.suspend()
        server.stop()  # resumes first, so SIGTERM is delivered, and takes the children down too
        assert server.proc.poll() is not None
        assert _until(lambda: not tree[1].is_running() or tree[1].status() == psutil.STATUS_ZOMBIE)
    finally:
        for p in root.children(recursive=True) if root.is_running() else []:
            p.kill()
        if server.proc.poll() is None:
            server.proc.kill()
