"""Run an ONNX graph with some of its internal tensors exposed as outputs (calibration statistics).

Bias correction and GPTQ both need what each convolution receives in the fp32 graph; ONNX Runtime only
returns graph outputs, so the tensors are added as outputs of a copy, and every optimisation is off so
that none of them is fused away.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper


def probe_tensors(model: onnx.ModelProto, names: list[str], feeds: Iterable[dict[str, np.ndarray]]
                  ) -> Iterator[dict[str, np.ndarray]]:
    """For each feed, the values of ``names`` (float tensors of ``model``), computed in float32."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in names if name not in present)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in sess.get_inputs()]
    for feed in feeds:
        yield dict(zip(names, sess.run(names, {k: feed[k] for k in inputs}), strict=True))
