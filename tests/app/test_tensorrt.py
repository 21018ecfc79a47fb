"""TensorRT provider options: one optimisation profile per graph from the manifest, caches, fp16.

No GPU here: these pin what the server hands ONNX Runtime. That TensorRT accepts it and how fast it
runs is measured by benchmarks/gpu_check.py on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.bundle.manifest import GraphSpec, TensorSpec
from app.core.config import Settings
from app.core.errors import BundleError
from app.inference.tensorrt import TensorRTConfig, profile_shapes, tensorrt_options

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def spec(*inputs: tuple[str, list[int | str]]) -> GraphSpec:
    file = {"file": "g.onnx", "sha256": "0" * 64, "size_bytes": 1}
    return GraphSpec(
        opset=17, inputs=[TensorSpec(name=n, dtype="float32", shape=s) for n, s in inputs],
        outputs=[TensorSpec(name="out", dtype="float32", shape=["batch", 4])], variants={"fp32": file},
    )


def config(tmp_path: Path, **kw: object) -> TensorRTConfig:
    return TensorRTConfig(**{"cache_dir": tmp_path / "trt", "max_batch": 64, "max_tokens": 48, **kw})  # type: ignore[arg-type]


def test_profiles_cover_batch_1_to_the_largest_call_and_tokens_1_to_max_length(tmp_path: Path) -> None:
    head = spec(("regions", ["batch", 49, 1280]), ("tokens", ["batch", "sequence", 384]),
                ("mask", ["batch", "sequence"]))
    cfg = config(tmp_path)
    assert profile_shapes(head, "min", cfg) == "regions:1x49x1280,tokens:1x1x384,mask:1x1"
    assert profile_shapes(head, "opt", cfg) == "regions:8x49x1280,tokens:8x16x384,mask:8x16"
    assert profile_shapes(head, "max", cfg) == "regions:64x49x1280,tokens:64x48x384,mask:64x48"


def test_opt_shapes_never_exceed_the_max_shapes(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_batch=4, max_tokens=8)
    assert profile_shapes(spec(("ids", ["batch", "sequence"])), "opt", cfg) == "ids:4x8"


def test_engine_and_timing_caches_are_on_and_fp16_follows_the_served_precision(tmp_path: Path) -> None:
    image = spec(("pixel_values", ["batch", 3, 224, 224]))
    fp32 = tensorrt_options(image, config(tmp_path))
    assert fp32["trt_engine_cache_enable"] == fp32["trt_timing_cache_enable"] == "True"
    assert fp32["trt_engine_cache_path"] == fp32["trt_timing_cache_path"] == str(tmp_path / "trt")
    assert fp32["trt_fp16_enable"] == "False"
    assert tensorrt_options(image, config(tmp_path, fp16=True))["trt_fp16_enable"] == "True"
    assert fp32["trt_profile_max_shapes"] == "pixel_values:64x3x224x224"


def test_an_axis_that_is_neither_batch_nor_sequence_is_refused_with_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"'height'.*MMFUSION_PROVIDERS=CUDAExecutionProvider"):
        tensorrt_options(spec(("pixel_values", ["batch", 3, "height", 224])), config(tmp_path))


def test_tensorrt_is_followed_by_cuda_for_the_nodes_it_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    from app.inference.runtime import resolve_providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    assert resolve_providers(TRT) == [TRT, CUDA, CPU]
    assert resolve_providers(f"{TRT},{CUDA}") == [TRT, CUDA, CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    assert resolve_providers(TRT) == [CPU]  # not installed: logged, and the CPU serves


def test_provider_options_give_each_graph_its_own_profile(tmp_path: Path) -> None:
    from app.inference.runtime import provider_options

    text = spec(("input_ids", ["batch", "sequence"]))
    options = provider_options([TRT, CUDA, CPU], text, config(tmp_path))
    assert options[0][0] == TRT and options[0][1]["trt_profile_max_shapes"] == "input_ids:64x48"  # type: ignore[index]
    assert options[1][0] == CUDA and options[1][1]["cudnn_conv_algo_search"] == "HEURISTIC"  # type: ignore[index]
    assert options[2] == CPU
    with pytest.raises(ValueError, match="TensorRTConfig"):
        provider_options([TRT, CPU])


def test_the_pipeline_creates_the_engine_cache_and_passes_the_served_limits(tiny_bundle: Path, tmp_path: Path) -> None:
    """The real loading path with TensorRT requested: ONNX Runtime without TensorRT warns and runs the
    graphs on the CPU, but the cache directory and every session's options are built on the way."""
    from app.bundle.verify import load_bundle_manifest
    from app.inference.runtime import load_sessions

    manifest = load_bundle_manifest(tiny_bundle)
    cfg = TensorRTConfig(cache_dir=tmp_path / "engines", max_batch=64, max_tokens=manifest.text.max_length)
    with pytest.warns(UserWarning, match=TRT):
        sessions = load_sessions(tiny_bundle, manifest, providers=[TRT, CPU], precision="fp32", intra_op_threads=1,
                                 tensorrt=cfg)
    assert (tmp_path / "engines").is_dir()
    assert set(sessions) == set(manifest.graphs)


def test_an_unwritable_engine_cache_fails_at_start_naming_the_setting(tiny_bundle: Path, tmp_path: Path) -> None:
    from app.bundle.verify import load_bundle_manifest
    from app.inference.runtime import load_sessions

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    manifest = load_bundle_manifest(tiny_bundle)
    cfg = TensorRTConfig(cache_dir=blocker / "engines", max_batch=8, max_tokens=manifest.text.max_length)
    with pytest.raises(BundleError, match="MMFUSION_TRT_CACHE_DIR"):
        load_sessions(tiny_bundle, manifest, providers=[TRT, CPU], precision="fp32", intra_op_threads=1, tensorrt=cfg)


def test_a_gpu_onnx_runtime_cannot_use_is_never_served_silently(tiny_bundle: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    # onnxruntime-gpu without a usable GPU (no --gpus, CUDA libraries of another major version) falls back
    # to the CPU with only a warning; the server must not then serve the GPU's precision on the CPU.
    import onnxruntime as ort

    from app.inference.pipeline import ModelPipeline

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with caplog.at_level("ERROR", logger="mmfusion.pipeline"):
        pipe = ModelPipeline(tiny_bundle, Settings(bundle=tiny_bundle, index_path=tmp_path / "index"))
    assert pipe.providers == [CPU] and pipe.active_providers == [CPU]
    assert "serving on the CPU" in caplog.text
    with pytest.raises(BundleError, match="MMFUSION_PROVIDERS"):
        ModelPipeline(tiny_bundle, Settings(bundle=tiny_bundle, index_path=tmp_path / "index", providers=CUDA))
