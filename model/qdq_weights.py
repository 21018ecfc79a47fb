"""Reading a static QDQ graph's quantized convolution weights: where bias correction and GPTQ both start.

ONNX Runtime's QDQ format stores a quantized weight as an integer initializer read through a
``DequantizeLinear`` (with its scale and zero point) that feeds the Conv's weight input; a weight left in
float has no such node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass(frozen=True)
class QuantizedWeight:
    integers_name: str
    """The initializer that holds the integers (the one GPTQ rewrites)."""
    integers: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    """Zeros of the scale's shape when the graph gives none (ONNX's default)."""


def quantized_weights(graph: onnx.GraphProto) -> dict[str, QuantizedWeight]:
    """Conv node name -> its quantized weight, for every Conv whose weight is read through a
    ``DequantizeLinear`` of initializers."""
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    found: dict[str, QuantizedWeight] = {}
    for node in graph.node:
        dq = producer.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue  # weights left in float
        scale = numpy_helper.to_array(inits[dq.input[1]])
        zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 else np.zeros_like(scale)
        found[node.name] = QuantizedWeight(dq.input[0], numpy_helper.to_array(inits[dq.input[0]]), scale, zero)
    return found
