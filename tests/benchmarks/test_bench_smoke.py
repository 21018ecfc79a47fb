"""The benchmark code itself works: model level + in-process ceiling + search on the tiny bundle.

Minimal durations, no server subprocesses (those need seconds each to start): what is pinned is
that every part runs end to end and reports positive, consistent numbers under the keys the
report, the README table and the plot read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.run import main


def test_quick_benchmark_reports_model_and_inprocess_figures(tiny_bundle: Path, tiny_run: Path, tmp_path: Path):
    out = tmp_path / "results"
    result = main([
        "--quick", "--bundle", str(tiny_bundle), "--run", str(tiny_run), "--threads", "1",
        "--parts", "model,server,index", "--servers", "inprocess", "--concurrency", "1,2",
        "--duration", "0.4", "--warmup", "0.1", "--batches", "1,4", "--eager-batches", "1,4",
        "--model-seconds", "0.05", "--index-n", "2000", "--peak-n", "256",
        "--serve-venv", str(tmp_path / "no-venv"), "--out-dir", str(out), "--tag", "smoke",
    ])
    saved = json.loads((out / "bench-smoke.json").read_text())
    assert saved["mode"] == "quick" and saved["acceptance"] == result["acceptance"]
    assert (out / "bench-smoke.md").read_text().startswith("## mmfusion benchmark (quick mode)")
    assert (out / "bench-smoke.png").stat().st_size > 1000

    assert saved["matmul_peak"]["peak_gflops"] > 0
    ml = saved["model_level"]
    assert ml["eager_same_weights"] is True
    cells = {(r["target"], r["batch"], r["engine"]) for r in ml["rows"]}
    for target in ("image_encoder", "text_encoder", "fusion_head", "pipeline"):
        for batch in (1, 4):
            assert {(target, batch, "pytorch_eager"), (target, batch, "ort_fp32")} <= cells
    for r in ml["rows"]:
        assert r["median_ms"] > 0 and r["items_per_s"] > 0 and r["reps"] >= 1
        if r["target"] in ("image_encoder", "fusion_head"):  # convolutions / matmuls: countable
            assert r["gflop_per_item"] > 0 and r["gflops"] > 0 and r["pct_of_peak"] > 0
        elif r["gflop_per_item"] is None:  # the tiny bundle's BiLSTM: the FLOP counter has no LSTM rule
            assert r["gflops"] is None and r["pct_of_peak"] is None
        assert abs(r["ms_per_item"] * r["batch"] - r["median_ms"]) < 0.01 * r["median_ms"] + 0.01
    pipeline_1 = next(x for x in ml["ratios"] if x["target"] == "pipeline" and x["batch"] == 1)
    assert pipeline_1["ort_fp32_vs_eager"] > 0

    levels = saved["server_level"]["workloads"]["classify_640x480"]["inprocess"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["errors"] == 0 and lv["completed"] > 0 and lv["throughput_rps"] > 0
        assert 0 < lv["p50_ms"] <= lv["p95_ms"] <= lv["p99_ms"]
    assert saved["serving_venv"]["exists"] is False

    idx = saved["index_search"]
    assert idx["n"] == 2000 and idx["dim"] == saved["bundle"]["embedding_dim"]
    assert idx["batch_1"]["median_ms"] > 0 and idx["exactness"]["top_k_id_mismatches"] == 0
    criteria = {c["criterion"] for c in saved["acceptance"]}
    assert "ORT pipeline vs PyTorch eager, batch 1: >= 3x per item" in criteria


def test_gpu_check_exits_2_with_a_clear_message_without_cuda(tiny_bundle: Path, tmp_path: Path, monkeypatch, capsys):
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert gpu_check.main(["--bundle", str(tiny_bundle), "--out", str(tmp_path / "gpu.json")]) == 2
    assert "no GPU to check" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()


def test_gpu_check_exits_2_when_onnx_runtime_lists_cuda_but_falls_back_to_the_cpu(tiny_bundle: Path, tmp_path: Path,
                                                                                   monkeypatch, capsys):
    # onnxruntime-gpu always lists CUDA; a session that cannot load its libraries silently runs on the CPU.
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check.ort, "get_available_providers", lambda: ["CUDAExecutionProvider",
                                                                           "CPUExecutionProvider"])
    assert gpu_check.main(["--bundle", str(tiny_bundle), "--out", str(tmp_path / "gpu.json")]) == 2
    assert "fell back to the CPU" in capsys.readouterr().err


def test_gpu_check_without_a_bundle_exits_2_naming_the_option(tmp_path: Path, capsys):
    from benchmarks import gpu_check

    assert gpu_check.main(["--bundle", str(tmp_path / "none"), "--dry-run-on-cpu"]) == 2
    assert "--bundle" in capsys.readouterr().err


def test_gpu_check_dry_run_reports_parity_and_timings_per_graph(tiny_bundle: Path, tmp_path: Path):
    from benchmarks import gpu_check

    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--bundle", str(tiny_bundle), "--dry-run-on-cpu", "--batches", "1,2", "--seconds", "0",
                           "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["dry_run_on_cpu"] is True and r["parity_ok"] is True
    assert {(g["graph"], g["batch"]) for g in r["graphs"]} == {
        (role, b) for role in ("image_encoder", "text_encoder", "fusion_head") for b in (1, 2)}
    assert all(p["min_cosine"] > 0.999 for p in r["parity"])
    assert [p["batch"] for p in r["pipeline"]] == [1, 2] and all(p["items_per_s"] > 0 for p in r["pipeline"])


def test_closed_loop_stretches_the_window_for_a_slow_server_and_counts_only_answers_inside_it():
    import asyncio

    from benchmarks.server_level import closed_loop

    async def slow() -> int:
        await asyncio.sleep(0.05)
        return 200

    async def failing() -> int:
        await asyncio.sleep(0.005)
        return 503

    stretched = asyncio.run(closed_loop(slow, 1, warmup_s=0.0, duration_s=0.1, min_completed=5))
    assert stretched["completed"] == 5 and stretched["window_s"] > 0.2
    assert 0.05 * 0.9 <= stretched["p50_ms"] / 1000 < 1.0
    assert abs(stretched["throughput_rps"] - 5 / stretched["window_s"]) < 0.05 * stretched["throughput_rps"]

    assert stretched["cpu_steal_pct"] is None or 0.0 <= stretched["cpu_steal_pct"] <= 100.0

    errors = asyncio.run(closed_loop(failing, 2, warmup_s=0.0, duration_s=0.1, min_completed=1))
    assert errors["completed"] == 0 and errors["errors"] > 0 and set(errors["errors_by_status"]) == {"503"}
    assert errors["throughput_rps"] == 0 and errors["p50_ms"] is None


def test_cpu_steal_is_the_stolen_share_of_all_ticks_between_two_readings(monkeypatch, tmp_path: Path) -> None:
    from benchmarks import common

    #          user nice system idle iowait irq softirq steal guest guest_nice
    before = "cpu  1000 0 200 5000 0 0 0 100 50 0\ncpu0 1 2 3\n"
    after = "cpu  1600 0 300 5800 0 0 0 400 90 0\ncpu0 1 2 3\n"
    stat = tmp_path / "stat"
    real_path = common.Path
    monkeypatch.setattr(common, "Path", lambda p: stat if p == "/proc/stat" else real_path(p))
    stat.write_text(before)
    t0 = common.cpu_ticks()
    stat.write_text(after)
    t1 = common.cpu_ticks()
    assert t0 == (100, 6300) and t1 == (400, 8100)  # guest time is already counted in user
    assert common.steal_pct(t0, t1) == round(100 * 300 / 1800, 2)
    assert common.steal_pct(None, t1) is None and common.steal_pct(t1, t1) is None


def test_gpu_check_reports_why_the_tensorrt_pipeline_did_not_run(tiny_bundle: Path, tmp_path: Path, monkeypatch):
    """Without TensorRT the CUDA figures stand and the JSON says why TensorRT is missing: not offered by
    ONNX Runtime at all, or offered but fallen back from (its libraries absent), as on this CPU build."""
    import argparse

    from app.core.config import Settings
    from app.inference.pipeline import ModelPipeline
    from benchmarks import gpu_check

    args = argparse.Namespace(out=tmp_path / "gpu.json", seconds=0.0)
    cpu_pipe = ModelPipeline(tiny_bundle, Settings(bundle=tiny_bundle, providers="CPUExecutionProvider"))
    result: dict = {"parity": []}
    no_trt = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(gpu_check.ort, "get_available_providers", lambda: no_trt)
    assert gpu_check.tensorrt_pipeline(tiny_bundle, "fp32", [1], args, cpu_pipe, {}, result) is True
    assert "has no TensorrtExecutionProvider" in result["tensorrt"][0]["skipped"]
    offered = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(gpu_check.ort, "get_available_providers", lambda: offered)
    with pytest.warns(UserWarning):
        assert gpu_check.tensorrt_pipeline(tiny_bundle, "fp32", [1], args, cpu_pipe, {}, result) is True
    # Offered, but its libraries are absent: ONNX Runtime falls back, and the pipeline refuses to serve an
    # explicitly requested GPU provider on the CPU.
    assert "requested but ONNX Runtime used none of them" in result["tensorrt"][1]["skipped"]
    assert (tmp_path / "trt-cache").is_dir() and result["parity"] == []


def test_a_level_of_several_windows_is_the_median_one_with_the_range_of_all() -> None:
    from benchmarks.server_level import median_window

    levels = [{"throughput_rps": r, "p99_ms": p, "concurrency": 16} for r, p in ((110, 200), (90, 260), (120, 180))]
    chosen = median_window(levels)
    assert chosen["throughput_rps"] == 110 and chosen["p99_ms"] == 200
    assert chosen["spread_rps"] == [90, 120] and chosen["spread_p99_ms"] == [180, 260] and chosen["windows"] == 3
    assert "spread_rps" not in median_window(levels[:1])  # one window: nothing to spread
    assert median_window(levels[:2])["throughput_rps"] == 90  # two middles: the lower one, never the flattering one
