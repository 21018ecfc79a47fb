"""INT8 variants: real quantized graphs in the manifest, served by the server, and checked by verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from app.bundle import load_bundle_manifest
from app.bundle.verify import sha256_file
from model.quantize import Int8Options

# Tiny models are too small for INT8 to be faster than fp32 (the per-call overhead dominates), so the
# shared int8 bundle keeps every faithful candidate regardless of speed; that exercises real quantized
# graphs end to end. The fidelity bars are the tiny model's: 16-unit LSTMs quantize worse than real ones.
TINY_INT8 = Int8Options(calibration_samples=64, selection_samples=128, require_speedup=False,
                        min_output_cosine=0.95, min_agreement=0.9, agreement_margin=0.0, bench_seconds=0.02)


@pytest.fixture(scope="module")
def int8_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.export import export_bundle

    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    export_bundle(tiny_run, out, progress=False, int8=True, int8_options=TINY_INT8)
    return out


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_variant_is_listed_hashed_and_its_quality_recorded(int8_bundle: Path) -> None:
    manifest = load_bundle_manifest(int8_bundle)  # checks every sha256, int8 files included
    assert manifest.precisions() == ["fp32", "int8"]
    quality = manifest.quality["int8"]
    assert quality.top1_agreement is not None and quality.top1_agreement >= 0.9
    assert quality.samples > 0
    assert quality.accuracy is not None and quality.accuracy_drop is not None
    assert quality.accuracy_drop == pytest.approx(
        json.loads((int8_bundle / "quantization.json").read_text())["fp32_accuracy"] - quality.accuracy
    )
    assert quality.min_embedding_cosine is not None and quality.min_embedding_cosine > 0.5
    for spec in manifest.graphs.values():
        variant = spec.variants["int8"]
        assert variant.sha256 == sha256_file(int8_bundle / variant.file)


def test_int8_quality_records_the_cpu_feature_its_full_range_weights_were_measured_with(int8_bundle: Path) -> None:
    from app.inference.cpu_features import EXACT_INT8_DOT, has_exact_int8_dot

    report = json.loads((int8_bundle / "quantization.json").read_text())
    served = [g["chosen"] for g in report["graphs"].values() if g["chosen"] != "fp32"]
    assert served  # the tiny int8 bundle keeps every faithful graph
    full_range = any("reduce_range" not in name for name in served)
    expected = [EXACT_INT8_DOT] if full_range and has_exact_int8_dot() is not False else []
    assert load_bundle_manifest(int8_bundle).quality["int8"].cpu_features == expected


@pytest.mark.parametrize(("full_range", "exact", "expected"), [
    ((True, False), True, ["exact_int8_dot"]),  # measured without saturation: a VNNI-less x86 would differ
    ((True,), None, ["exact_int8_dot"]),  # unknown CPU: recorded, so a serving CPU is checked
    ((True, False), False, []),  # measured on a saturating CPU: the figures already include it
    ((False, False), True, []),  # 7-bit weights cannot saturate anywhere
    ((), True, []),  # nothing in INT8
])
def test_only_full_range_int8_weights_measured_without_saturation_need_exact_int8_products(
    full_range: tuple[bool, ...], exact: bool | None, expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import model.quantize as quantize
    from model.quantize import CandidateResult, cpu_features_needed

    monkeypatch.setattr(quantize, "has_exact_int8_dot", lambda: exact)
    served = [CandidateResult("c", 1, 1, 1, 1, 1.0, {}, {}, full_range_weights=f) for f in full_range]
    assert cpu_features_needed(served) == expected


def test_int8_graphs_are_really_quantized_the_way_their_kind_needs(int8_bundle: Path) -> None:
    manifest = load_bundle_manifest(int8_bundle)
    image = manifest.graphs["image_encoder"].variants["int8"].file
    assert image == "image_encoder.int8.onnx"
    image_ops = _ops(int8_bundle / image)
    # static QDQ: activations quantized with calibrated scales, never the slow dynamic ConvInteger
    assert {"QuantizeLinear", "DequantizeLinear"} <= image_ops
    assert "ConvInteger" not in image_ops and "DynamicQuantizeLinear" not in image_ops
    report = json.loads((int8_bundle / "quantization.json").read_text())
    assert report["graphs"]["image_encoder"]["chosen"].startswith("static_qdq_per_channel")
    for role in ("text_encoder", "fusion_head"):
        chosen = report["graphs"][role]["chosen"]
        assert chosen == "fp32" or chosen.startswith(("dynamic", "static_qdq")), chosen
    # every variant passes the ONNX checker and its fp32 twin has the same interface
    for spec in manifest.graphs.values():
        for variant in spec.variants.values():
            onnx.checker.check_model(str(int8_bundle / variant.file), full_check=True)


def test_server_loads_the_int8_variant_and_reports_it(int8_bundle: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    settings = Settings(bundle=int8_bundle, index_path=tmp_path / "index", precision="int8", intra_op_threads=1,
                        decode_threads=1)
    with TestClient(create_app(settings)) as client:
        body = client.get("/v1/model").json()
        assert body["precision"] == "int8"
        assert body["available_precisions"] == ["fp32", "int8"]
        assert body["graphs"]["image_encoder"]["file"] == "image_encoder.int8.onnx"
        r = client.post("/v1/embed", json={"text": "a small blue square"})
        assert r.status_code == 200, r.text


def _add_int8_to_a_copy(tiny_bundle: Path, tiny_run: Path, bundle: Path, options: Int8Options):
    """``add_int8_variants`` on a copy of the tiny bundle, with the run's own splits: (graphs, quality, report)."""
    from app.preprocessing.text import TextTokenizer
    from model.data.prepared import prepare_data
    from model.export import add_int8_variants, quant_data
    from model.train import load_run

    shutil.copytree(tiny_bundle, bundle)
    manifest = load_bundle_manifest(bundle)
    _, cfg, _ = load_run(tiny_run)
    data = prepare_data(cfg, progress=False)
    qdata = quant_data({s: data.split(s) for s in ("train", "val", "test")}, manifest.image, list(manifest.labels),
                       options)
    tok = TextTokenizer(bundle / "tokenizer.json", manifest.text.max_length)
    return add_int8_variants(bundle, dict(manifest.graphs), tok, qdata, options)


def test_graph_that_int8_does_not_speed_up_reuses_its_fp32_file(tiny_bundle: Path, tiny_run: Path,
                                                                  tmp_path: Path) -> None:
    """A speed bar no INT8 graph can clear: every graph's int8 variant must point at its fp32 file."""
    bundle = tmp_path / "b"
    options = Int8Options(calibration_samples=32, selection_samples=32, evaluation_samples=64, min_speedup=1e9,
                          bench_seconds=0.01)
    updated, quality, report = _add_int8_to_a_copy(tiny_bundle, tiny_run, bundle, options)
    for role, spec in updated.items():
        assert spec.variants["int8"] == spec.variants["fp32"], role
        assert report.graphs[role].chosen == "fp32"
        assert report.graphs[role].reason
    assert any("not faster" in c.reason for g in report.graphs.values() for c in g.candidates)
    assert not list(bundle.glob("*.int8.onnx"))
    assert quality.top1_agreement == 1.0
    assert quality.min_embedding_cosine == pytest.approx(1.0, abs=1e-6)


def test_verify_passes_on_the_good_int8_bundle(int8_bundle: Path, tiny_run: Path) -> None:
    from model.verify import verify_bundle

    report = verify_bundle(int8_bundle, run_dir=tiny_run, min_int8_agreement=TINY_INT8.min_agreement)
    assert report["ok"], report["failures"]
    assert report["inputs"]["kind"] == "real"
    assert report["pytorch_parity"]["ok"]
    recorded = load_bundle_manifest(int8_bundle).quality["int8"].top1_agreement
    assert report["variants"]["int8"]["top1_agreement_vs_fp32"] == pytest.approx(recorded, abs=0.01)


def _swap_in_impostor(bundle: Path, role: str) -> None:
    """Replace a graph's int8 file by a same-interface graph with other weights, and re-hash the manifest
    so the sha256 check passes: only re-measuring the outputs can catch it."""
    manifest_path = bundle / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    variant = raw["graphs"][role]["variants"]["int8"]
    fp32 = raw["graphs"][role]["variants"]["fp32"]
    proto = onnx.load(str(bundle / fp32["file"]))
    rng = np.random.default_rng(7)
    for init in proto.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 16:
            init.CopyFrom(numpy_helper.from_array(rng.permutation(w.ravel()).reshape(w.shape), init.name))
    name = f"{role}.impostor.onnx"
    onnx.save(proto, str(bundle / name))
    path = bundle / name
    variant.update(file=name, sha256=sha256_file(path), size_bytes=path.stat().st_size)
    manifest_path.write_text(json.dumps(raw, indent=2))


@pytest.mark.parametrize("with_data", [True, False], ids=["real-samples", "random-inputs"])
def test_verify_fails_when_an_int8_graph_is_swapped_and_rehashed(int8_bundle: Path, tiny_run: Path,
                                                                 tmp_path: Path, with_data: bool, capsys) -> None:
    from model.cli import main

    bundle = tmp_path / "swapped"
    shutil.copytree(int8_bundle, bundle)
    _swap_in_impostor(bundle, "image_encoder")
    load_bundle_manifest(bundle)  # the sha256 check alone is fooled
    argv = ["verify", str(bundle), "--min-int8-agreement", str(TINY_INT8.min_agreement)]
    if with_data:
        argv += ["--run", str(tiny_run)]
    assert main(argv) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"]
    assert any(f.startswith("int8") for f in report["failures"]), report["failures"]
    assert report["inputs"]["kind"] == ("real" if with_data else "random")


def test_verify_fails_on_a_tampered_file(int8_bundle: Path, tmp_path: Path) -> None:
    from model.verify import verify_bundle

    bundle = tmp_path / "tampered"
    shutil.copytree(int8_bundle, bundle)
    target = bundle / "image_encoder.int8.onnx"
    target.write_bytes(target.read_bytes()[:-10])
    report = verify_bundle(bundle)
    assert not report["ok"]
    assert "sha256" in report["failures"][0]


# The acceptance rule on measured numbers (the measurements themselves are exercised above).
HEAD_INPUTS = {"text_features", "text_tokens", "image_features", "image_regions", "attention_mask"}
CONSUMED = HEAD_INPUTS | {"image_embedding", "text_embedding", "probabilities"}


def test_head_only_features_need_the_looser_floor_and_the_agreement_decides() -> None:
    from model.quantize import refusal

    opts = Int8Options()
    # the default bundle's dynamic INT8 MiniLM on an AVX2 CPU: pooled/embedding 0.994, per-token 0.975
    text = {"text_features": 0.994, "text_tokens": 0.9747, "text_embedding": 0.9941}
    assert refusal(text, CONSUMED, None, 1.4, True, opts) == ""
    assert refusal({**text, "text_tokens": 0.93}, CONSUMED, None, 1.4, True, opts).startswith(
        "fusion-head input cosine text_tokens 0.9300")
    # what users receive keeps the strict bar
    assert refusal({**text, "text_embedding": 0.975}, CONSUMED, None, 1.4, True, opts).startswith(
        "output cosine text_embedding 0.9750 < 0.98")
    # an output nothing reads is not judged (a concat head never reads token features)
    assert refusal(text, CONSUMED - {"text_tokens"} | {"text_features"}, None, 1.4, True,
                   Int8Options(min_head_input_cosine=0.99)) == ""
    assert refusal({"probabilities": 0.9999}, CONSUMED, 0.985, 2.0, False, opts) == "top-1 agreement 0.9850 < 0.9900"


def test_batch_variant_candidates_are_timed_as_served_one_row_per_call() -> None:
    from model.quantize import refusal, served_speedup

    # batch 1: 2x faster; batch 8: the INT8 call is 2x faster too, but the server runs 8 single rows
    assert served_speedup(8.0, 4.0, 40.0, 20.0, batch_variant=False) == pytest.approx(2.0)
    assert served_speedup(8.0, 4.0, 40.0, 20.0, batch_variant=True) == pytest.approx((2.0 * 40 / 32) ** 0.5)
    # a graph whose single-row INT8 calls lose to fp32 batching is refused, and says why
    slow = served_speedup(1.0, 0.9, 2.0, 1.0, batch_variant=True)
    assert slow < 1.0
    reason = refusal({"probabilities": 1.0}, CONSUMED, 1.0, slow, True, Int8Options())
    assert reason.startswith("not faster") and "served one row per call" in reason


def test_a_probability_row_that_does_not_sum_to_one_is_refused() -> None:
    from model.quantize import refusal

    # a uint8 Softmax output: every row 255/256, cosine and agreement perfect, still wrong to serve
    reason = refusal({"probabilities": 1.0}, CONSUMED, 1.0, 2.0, False, Int8Options(), probability_sum_error=1 / 256)
    assert reason.startswith("probabilities do not sum to 1")
    assert refusal({"probabilities": 1.0}, CONSUMED, 1.0, 2.0, False, Int8Options(), probability_sum_error=2e-7) == ""


def test_static_qdq_keeps_the_fusion_heads_softmax_in_float(tiny_bundle: Path, tmp_path: Path) -> None:
    """CI once served a static-QDQ fusion head whose probabilities summed to 0.9961: ONNX Runtime had
    quantized the Softmax output to 1/256 steps. Static candidates must leave Softmax in float."""
    import onnxruntime as ort

    from model.quantize import Candidate, preprocess, quantize_candidate

    manifest = load_bundle_manifest(tiny_bundle)
    src = tiny_bundle / manifest.graphs["fusion_head"].variants["fp32"].file
    fp32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)

    def feed(batch: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i in fp32.get_inputs():
            shape = [d if isinstance(d, int) else (batch if n == 0 else 6) for n, d in enumerate(i.shape)]
            if "int" in i.type:
                out[i.name] = np.ones(shape, np.int64)
            else:
                out[i.name] = rng.standard_normal(shape).astype(np.float32)
        return out

    assert "Softmax" in _ops(src)
    pre = preprocess(src, tmp_path / "head.pre.onnx")
    out = quantize_candidate(pre, tmp_path / "head.int8.onnx", Candidate("static_qdq", "minmax", "uint8"),
                             [feed(4) for _ in range(8)], tmp_path)
    graph = onnx.load(str(out)).graph
    assert "QuantizeLinear" in {n.op_type for n in graph.node}  # the head really is quantized
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    assert softmax, "Softmax must stay a float op, not become QLinearSoftmax"
    consumers = {n.op_type for n in graph.node for s in softmax if s.output[0] in n.input}
    assert "QuantizeLinear" not in consumers
    probs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["probabilities"], feed(16))[0]
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_candidates_are_timed_with_the_threads_the_server_gives_each_graph() -> None:
    from app.core.config import container_cpus
    from app.inference.runtime import intra_op_split

    served = Int8Options()
    for role in ("image_encoder", "text_encoder", "fusion_head"):
        assert served.threads_for(role) == intra_op_split(role, container_cpus())
    assert served.threads_for("fusion_head") == 1  # the server never gives the small head more
    assert Int8Options(threads=3).threads_for("fusion_head") == 3  # an explicit count wins


def test_a_scope_kept_in_float_reads_float_weights_while_the_rest_is_quantized(tiny_bundle: Path,
                                                                               tmp_path: Path) -> None:
    """The mixed-precision candidate: ``keep_float`` must leave that block's weights unquantized (and
    nothing else), on the real exported image encoder."""
    from model.mixed_precision import module_scopes
    from model.quantize import Candidate, preprocess, quantize_candidate

    manifest = load_bundle_manifest(tiny_bundle)
    src = tiny_bundle / manifest.graphs["image_encoder"].variants["fp32"].file
    pre = preprocess(src, tmp_path / "image.pre.onnx")
    scopes = module_scopes(onnx.load(str(pre)).graph)
    other, kept = list(scopes)[:2]
    size = manifest.image.size
    rng = np.random.default_rng(0)
    calib = [{"pixel_values": rng.standard_normal((4, 3, size, size)).astype(np.float32)} for _ in range(4)]
    out = quantize_candidate(pre, tmp_path / "image.int8.onnx",
                             Candidate("static_qdq", "minmax", "uint8", keep_float=(kept,)), calib, tmp_path)
    graph = onnx.load(str(out)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    in_kept = [n for name, n in convs.items() if name in scopes[kept]]
    in_other = [n for name, n in convs.items() if name in scopes[other]]
    assert in_kept and in_other
    assert all(n.input[1] not in dequantized for n in in_kept), "the kept scope's weights must stay float"
    assert all(n.input[1] in dequantized for n in in_other), "the other scopes must still be quantized"
    with pytest.raises(ValueError, match="no module scope"):
        quantize_candidate(pre, tmp_path / "bad.onnx", Candidate("static_qdq", "minmax", "uint8",
                                                                 keep_float=("/no/such/block",)), calib, tmp_path)


def test_the_float_search_runs_and_is_recorded_when_static_candidates_miss_only_fidelity(
        tiny_bundle: Path, tiny_run: Path, tmp_path: Path) -> None:
    """A fidelity bar no fully quantized CNN meets: the search ranks every module scope of the image encoder
    and its measurements land in the report (and ``quantization.json``)."""
    from model.mixed_precision import module_scopes
    from model.quantize import preprocess

    bundle = tmp_path / "b"
    options = Int8Options(calibration_samples=32, selection_samples=32, evaluation_samples=64, bench_seconds=0.01,
                          min_output_cosine=0.99999, min_head_input_cosine=0.99999, require_speedup=False,
                          max_float_scopes=2, skip={"text_encoder": "test", "fusion_head": "test"})
    _, _, report = _add_int8_to_a_copy(tiny_bundle, tiny_run, bundle, options)
    image = report.graphs["image_encoder"]
    assert all(c.reason.startswith("output cosine") for c in image.candidates if not c.keep_float)
    search = image.float_search
    assert search is not None and search["base"] in {c.candidate for c in image.candidates}
    scopes = module_scopes(onnx.load(str(preprocess(bundle / "image_encoder.onnx", tmp_path / "pre.onnx"))).graph)
    assert set(search["gains"]) == set(scopes)  # every scope with a conv/matmul was measured alone
    assert search["steps"][0]["keep_float"] == [] and search["outcome"]
    tried = [c for c in image.candidates if c.keep_float]
    assert len(tried) == (1 if search["outcome"].startswith("passes") else 0)
    assert json.loads(json.dumps(report.to_dict()))["graphs"]["image_encoder"]["float_search"] == search


def test_export_warns_when_auto_precision_will_not_serve_the_int8_variant() -> None:
    """The validation split chooses the mix, the test split is recorded, and the server's ``auto`` reads the
    recorded figure: a variant under its bar would ship and silently never be used."""
    from app.bundle.manifest import VariantQuality
    from app.inference.runtime import MIN_TOP1_AGREEMENT
    from model.export import auto_precision_note

    assert auto_precision_note("int8", VariantQuality(top1_agreement=MIN_TOP1_AGREEMENT, samples=1200)) is None
    assert auto_precision_note("int8", VariantQuality(top1_agreement=None)) is None
    note = auto_precision_note("int8", VariantQuality(top1_agreement=0.9892, samples=1200))
    assert note is not None and "0.9892 on 1200" in note and "MMFUSION_PRECISION=int8" in note


def test_an_encoder_whose_cosines_pass_but_whose_answers_move_is_refused_and_goes_to_the_float_search(
        tiny_bundle: Path, tiny_run: Path, tmp_path: Path) -> None:
    """Cosines are not answers: an encoder candidate that passes every cosine gate is judged by the pipeline's
    top-1 agreement with only it in INT8, and a refusal there starts the float search straight at its answer
    ranking (round 2), since the gates already pass."""
    options = Int8Options(calibration_samples=32, selection_samples=32, evaluation_samples=64, bench_seconds=0.01,
                          min_output_cosine=0.0, min_head_input_cosine=0.0, require_speedup=False,
                          min_agreement=1.0001, float_search_agreement=1.0001, max_float_scopes=1,
                          skip={"text_encoder": "test", "fusion_head": "test"})
    _, _, report = _add_int8_to_a_copy(tiny_bundle, tiny_run, tmp_path / "b", options)
    image = report.graphs["image_encoder"]
    plain = [c for c in image.candidates if not c.keep_float]
    assert plain and all(c.reason.startswith("top-1 agreement") for c in plain), [c.reason for c in plain]
    assert all(c.top1_agreement is not None and 0.0 <= c.top1_agreement <= 1.0 for c in plain)
    search = image.float_search
    assert search is not None and search["base_margin"] >= 0
    assert search["gains"] == {} and search["divergence_gains"]  # no margin ranking: straight to the answers
    assert search["outcome"].startswith("no ")  # agreement above 1 cannot be reached
    assert image.chosen == "fp32"


@pytest.mark.parametrize("exact_int8_dot", [True, False])
def test_7_bit_static_candidates_are_measured_only_where_8_bit_products_may_saturate(exact_int8_dot: bool) -> None:
    """With exact 8-bit products (VNNI) 7-bit weights run the same kernels and only lose precision; without,
    they are the candidates that cannot saturate."""
    from model.default_bundle import image_encoder_plan
    from model.quantize import candidates_for

    conv = candidates_for("image_encoder", {"Conv": 10}, exact_int8_dot=exact_int8_dot)
    assert any(c.gptq and not c.reduce_range for c in conv)
    assert any(c.reduce_range for c in conv) is not exact_int8_dot
    text = candidates_for("text_encoder", {"MatMul": 10}, exact_int8_dot=exact_int8_dot)
    assert [c.name for c in text] == ["dynamic_per_channel", "dynamic_per_channel_reduce_range"]  # unchanged
    (plan,) = image_encoder_plan(exact_int8_dot)
    assert plan.gptq and plan.bias_correction and plan.reduce_range is not exact_int8_dot


def test_a_choice_must_clear_the_agreement_bar_by_the_sampling_noise_of_its_validation_rows() -> None:
    from model.quantize import agreement_floor, refusal

    assert agreement_floor(0.99, 1000, 1.0) == pytest.approx(0.99 + (0.99 * 0.01 / 1000) ** 0.5)  # 0.9931
    assert agreement_floor(0.99, 1000, 0.0) == 0.99
    assert agreement_floor(0.99, 10_000, 1.0) < agreement_floor(0.99, 1000, 1.0)  # more rows, less noise
    assert agreement_floor(0.99, 0, 1.0) == 0.99
    assert agreement_floor(0.99, 10, 1.0) == 1.0  # 10 rows: only perfect agreement is evidence enough
    assert agreement_floor(1.0001, 32, 1.0) == 1.0001  # an unreachable bar stays unreachable
    floor = agreement_floor(0.99, 1000, 1.0)
    # 0.992 passes the bar itself but not its noise: refused, as the default image encoder was
    assert refusal({"probabilities": 1.0}, CONSUMED, 0.992, 2.0, False, Int8Options(), 0.0, floor) == \
        f"top-1 agreement 0.9920 < {floor:.4f}"
    assert refusal({"probabilities": 1.0}, CONSUMED, 0.994, 2.0, False, Int8Options(), 0.0, floor) == ""


def test_faster_wins_only_beyond_the_timing_noise_and_fidelity_decides_within_it() -> None:
    from model.quantize import CandidateResult, _better

    def cand(speedup: float, cosine: float) -> CandidateResult:
        return CandidateResult("c", 1, 1, 1, 1, speedup, {"image_embedding": cosine}, {})

    # kernel-identical candidates timed x1.94 vs x1.70 on the 2-core VM: the more faithful one wins
    assert _better(cand(1.70, 0.995), cand(1.94, 0.990))
    assert not _better(cand(1.94, 0.990), cand(1.70, 0.995))
    # a real difference (u8s8 vs s8s8 kernels: x1.9 vs x0.9) is speed
    assert _better(cand(1.9, 0.990), cand(0.9, 0.995))
    assert _better(cand(1.0, 0.995), cand(2.0, 0.990), by_speed=False)  # speed not the point
