"""GPTQ rounding of INT8 conv weights (model.gptq): what it computes, and that it beats rounding to nearest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from model.gptq import conv_input_hessians, gptq_round
from model.quantize import Candidate, quantize_candidate


def _correlated_inputs(rng: np.random.Generator, d: int, n: int) -> np.ndarray:
    """[d, n] inputs that live mostly in a few directions, like neighbouring pixels and related channels."""
    return rng.standard_normal((d, 3)) @ rng.standard_normal((3, n)) + 0.05 * rng.standard_normal((d, n))


def test_with_an_identity_hessian_nothing_can_absorb_an_error_and_gptq_rounds_to_nearest() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 12))
    scale = np.abs(w).max(1) / 127
    np.testing.assert_array_equal(gptq_round(w, np.eye(12), scale), np.clip(np.round(w / scale[:, None]), -127, 127))


def test_gptq_keeps_the_output_of_correlated_inputs_far_closer_than_rounding_to_nearest() -> None:
    rng = np.random.default_rng(0)
    d, rows = 24, 16
    x = _correlated_inputs(rng, d, 4000)
    w = rng.standard_normal((rows, d))
    scale = np.abs(w).max(1) / 15  # 5-bit weights: a large rounding error to absorb
    q = gptq_round(w, x @ x.T / x.shape[1], scale, qmax=15)
    nearest = np.clip(np.round(w / scale[:, None]), -15, 15)
    assert np.all(q == np.round(q)) and np.abs(q).max() <= 15

    def error(ints: np.ndarray) -> float:
        return float((((w - ints * scale[:, None]) @ x) ** 2).mean())

    assert error(q) < 0.5 * error(nearest)


def test_one_hessian_per_row_gives_what_each_row_gets_alone() -> None:
    """The depthwise form ([C, k*k, k*k], every channel its own input) is C independent problems."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 9))
    hs = np.stack([(x := _correlated_inputs(rng, 9, 500)) @ x.T / 500 for _ in range(4)])
    scale = np.abs(w).max(1) / 127
    together = gptq_round(w, hs, scale)
    for r in range(4):
        np.testing.assert_array_equal(together[r], gptq_round(w[r : r + 1], hs[r], scale[r : r + 1])[0])


def _graph(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> 1x1 conv (4 -> 6) -> Relu -> depthwise 3x3 conv, padding 1, stride 2 -> y."""
    w1 = rng.standard_normal((6, 4, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((6, 1, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (np.zeros(6, np.float32), "b1"),
                                                         (w2, "w2"), (np.full(6, 0.1, np.float32), "b2"))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="/enc/block.0/Conv"),
             helper.make_node("Relu", ["c1"], ["r1"], name="/enc/block.0/Relu"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="/enc/block.1/Conv", group=6,
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 6, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Input channels that move together (one shared signal plus a little noise each)."""
    out = []
    for _ in range(4):
        shared = rng.standard_normal((8, 1, 8, 8))
        out.append({"x": (shared + 0.1 * rng.standard_normal((8, 4, 8, 8)) + 0.5).astype(np.float32)})
    return out


def test_hessians_are_the_second_moments_of_each_convs_input_patches() -> None:
    rng = np.random.default_rng(0)
    model, feeds = _graph(rng), _feeds(rng)
    hessians = conv_input_hessians(model, feeds)
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    pixels = x.transpose(1, 0, 2, 3).reshape(4, -1)  # 1x1 conv: a patch is one pixel's channels
    np.testing.assert_allclose(hessians["/enc/block.0/Conv"], pixels @ pixels.T / pixels.shape[1], rtol=1e-4)
    # depthwise 3x3, padding 1, stride 2: channel c's 9-tap patches at the 4x4 output positions
    w1 = numpy_helper.to_array(model.graph.initializer[0]).reshape(6, 4).astype(np.float64)
    r1 = np.maximum(np.einsum("oc,nchw->nohw", w1, x), 0)
    padded = np.pad(r1, ((0, 0), (0, 0), (1, 1), (1, 1)))
    taps = np.stack([padded[:, :, i : i + 7 : 2, j : j + 7 : 2] for i in range(3) for j in range(3)], axis=2)
    per_channel = taps.transpose(1, 2, 0, 3, 4).reshape(6, 9, -1)
    expected = np.einsum("ckl,cjl->ckj", per_channel, per_channel) / per_channel.shape[2]
    assert hessians["/enc/block.1/Conv"].shape == (6, 9, 9)
    np.testing.assert_allclose(hessians["/enc/block.1/Conv"], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduce_range", [False, True])
def test_a_gptq_candidate_keeps_the_scales_changes_only_integers_and_moves_the_output_less(
        tmp_path: Path, reduce_range: bool) -> None:
    rng = np.random.default_rng(0)
    model, feeds = _graph(rng), _feeds(rng)
    src = tmp_path / "g.onnx"
    onnx.save(model, str(src))
    plain = Candidate("static_qdq", "minmax", "uint8", reduce_range=reduce_range)
    gptq = Candidate("static_qdq", "minmax", "uint8", reduce_range=reduce_range, gptq=True)
    graphs = {c.name: quantize_candidate(src, tmp_path / f"{c.name}.onnx", c, feeds, tmp_path) for c in (plain, gptq)}
    a, b = ({i.name: numpy_helper.to_array(i) for i in onnx.load(str(graphs[c.name])).graph.initializer}
            for c in (plain, gptq))
    assert a.keys() == b.keys()
    weights = [k for k, v in a.items() if v.dtype == np.int8 and v.ndim == 4]
    assert weights and any(not np.array_equal(a[k], b[k]) for k in weights)
    for k in a:
        if k not in weights:
            np.testing.assert_array_equal(a[k], b[k])  # scales, zero points, biases: untouched
    limit = 64 if reduce_range else 127
    assert all(np.abs(b[k]).max() <= limit for k in weights)

    def error(path: Path) -> float:
        """Judged as exact fake-quant arithmetic (no fused integer kernels), so the CPU cannot decide it."""
        exact = ort.SessionOptions()
        exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
        got = ort.InferenceSession(str(path), exact, providers=["CPUExecutionProvider"])
        return float(np.mean([((ref.run(None, f)[0] - got.run(None, f)[0]) ** 2).mean() for f in feeds]))

    assert error(graphs[gptq.name]) < error(graphs[plain.name])


def test_columns_are_rounded_in_order_of_input_energy_whatever_order_they_come_in() -> None:
    """act-order: the result does not depend on how the input columns happen to be numbered."""
    rng = np.random.default_rng(2)
    x = _correlated_inputs(rng, 10, 2000) * np.linspace(0.2, 3.0, 10)[:, None]
    w = rng.standard_normal((6, 10))
    scale = np.abs(w).max(1) / 15
    shuffle = rng.permutation(10)
    q = gptq_round(w, x @ x.T / 2000, scale, qmax=15)
    xs = x[shuffle]
    np.testing.assert_array_equal(gptq_round(w[:, shuffle], xs @ xs.T / 2000, scale, qmax=15), q[:, shuffle])
