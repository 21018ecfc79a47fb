"""Bias correction: a quantized conv's output mean equals fp32's again, for plain and depthwise convs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from model.bias_correction import conv_input_means, correct_biases
from model.quantize import Candidate, quantize_candidate


def _graph(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> 1x1 conv (4 -> 6) -> Relu -> depthwise 3x3 conv (6 groups, no padding) -> y; weights with a few
    large values, so that rounding them shifts the output means visibly."""
    w1 = (rng.standard_normal((6, 4, 1, 1)) * np.where(rng.random((6, 4, 1, 1)) < 0.2, 8, 0.3)).astype(np.float32)
    w2 = (rng.standard_normal((6, 1, 3, 3)) * np.where(rng.random((6, 1, 3, 3)) < 0.2, 8, 0.3)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (np.zeros(6, np.float32), "b1"),
                                                         (w2, "w2"), (np.zeros(6, np.float32), "b2"))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="/enc/block.0/Conv"),
             helper.make_node("Relu", ["c1"], ["r1"], name="/enc/block.0/Relu"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="/enc/block.1/Conv", group=6)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 6, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv_mean(x: np.ndarray, w: np.ndarray, b: np.ndarray, groups: int) -> np.ndarray:
    """Per-output-channel mean over batch and pixels of a conv without padding (computed directly)."""
    per, (kh, kw) = w.shape[1], w.shape[2:]
    oh, ow = x.shape[2] - kh + 1, x.shape[3] - kw + 1
    means = []
    for o in range(w.shape[0]):
        xs = x[:, (o // (w.shape[0] // groups)) * per:][:, :per]
        acc = sum(np.einsum("nchw,c->nhw", xs[:, :, i:i + oh, j:j + ow], w[o, :, i, j])
                  for i in range(kh) for j in range(kw))
        means.append(acc.mean() + b[o])
    return np.array(means)


def test_corrected_biases_give_the_quantized_weights_fp32s_output_means(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = _graph(rng)
    src = tmp_path / "g.onnx"
    onnx.save(model, str(src))
    feeds = [{"x": (rng.standard_normal((8, 4, 8, 8)) + 1.5).astype(np.float32)} for _ in range(4)]
    cand = Candidate("static_qdq", "minmax", "uint8", reduce_range=True)
    quantized = onnx.load(str(quantize_candidate(src, tmp_path / "q.onnx", cand, feeds, tmp_path)))
    means = conv_input_means(model, feeds)
    assert set(means) == {"/enc/block.0/Conv", "/enc/block.1/Conv"}
    np.testing.assert_allclose(means["/enc/block.0/Conv"], np.concatenate([f["x"] for f in feeds]).mean((0, 2, 3)),
                               rtol=1e-5)

    corrected, changed = correct_biases(model, quantized, means)
    assert changed == 2
    q_inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    c_inits = {i.name: numpy_helper.to_array(i) for i in corrected.graph.initializer}
    x = np.concatenate([f["x"] for f in feeds])
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    r1 = np.maximum(np.einsum("nchw,oc->nohw", x, w1[:, :, 0, 0]), 0)
    for weight, bias, inp, groups in (("w1", "b1", x, 1), ("w2", "b2", r1, 6)):
        w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == weight))
        scale = q_inits[f"{weight}_scale"].reshape(-1, 1, 1, 1)
        wq = q_inits[f"{weight}_quantized"].astype(np.float32) * scale
        fp32 = _conv_mean(inp, w, np.zeros(len(w), np.float32), groups)
        rounded = _conv_mean(inp, wq, np.zeros(len(w), np.float32), groups)
        fixed = _conv_mean(inp, wq, c_inits[bias], groups)
        before, after = np.abs(rounded - fp32).max(), np.abs(fixed - fp32).max()
        assert before > 1e-3, "the test's weights must round visibly"
        if groups == 1:  # 1x1: the corrected mean is exactly fp32's
            np.testing.assert_allclose(fixed, fp32, atol=1e-4)
        else:  # 3x3 without padding: E[x] over all pixels stands in for each window's mean
            assert after < 0.2 * before, (before, after)


def test_a_bias_corrected_candidate_is_named_and_built(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    src = tmp_path / "g.onnx"
    onnx.save(_graph(rng), str(src))
    feeds = [{"x": rng.standard_normal((4, 4, 8, 8)).astype(np.float32)} for _ in range(2)]
    cand = Candidate("static_qdq", "percentile", "uint8", reduce_range=True, bias_correction=True)
    assert cand.name.endswith("_reduce_range_bias_corrected")
    out = quantize_candidate(src, tmp_path / "bc.onnx", cand, feeds, tmp_path)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "DequantizeLinear" in ops and (tmp_path / "g.conv_input_means.npz").exists()  # means kept for the next
    assert not np.allclose(  # the built graph carries corrected biases, not the originals (zeros)
        numpy_helper.to_array(next(i for i in onnx.load(str(out)).graph.initializer if i.name == "b1_quantized")), 0)
