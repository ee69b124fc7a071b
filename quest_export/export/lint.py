"""TensorRT explicit-quantization lint: the rules a Q/DQ graph must follow to build as INT8/INT4.

Checked statically on the ONNX graph (TensorRT itself cannot run here):
zero points 0 and constant, scales constant, positive and finite, per-channel scales only on
constant-rooted (weight) inputs along the output-channel axis, INT4 only on MatMul/Gemm weights
(opset >= 21), no uint8 Q/DQ, opset >= 19 for an FP16 graph with Q/DQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

QDQ = ("QuantizeLinear", "DequantizeLinear")
INT4_TYPES = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


@dataclass(frozen=True)
class LintIssue:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


def _opset(model: onnx.ModelProto) -> int:
    return next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    found = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    found[node.output[0]] = attr.t
    return found


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def lint_tensorrt(model: onnx.ModelProto) -> list[LintIssue]:
    """Every violation of TensorRT's explicit-quantization rules in ``model`` (empty: clean)."""
    issues: list[LintIssue] = []
    opset = _opset(model)
    consts = _constants(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    qdq_nodes = [n for n in model.graph.node if n.op_type in QDQ]
    if qdq_nodes and opset < 19:
        issues.append(LintIssue("opset", "graph", f"opset {opset} < 19: FP16 Q/DQ needs opset 19 or newer"))
    for node in qdq_nodes:
        label = node.name or node.output[0]
        scale_name = node.input[1] if len(node.input) > 1 else ""
        scale = consts.get(scale_name)
        if scale is None:
            issues.append(LintIssue("constant-scale", label, f"scale {scale_name!r} is not a constant initializer"))
            continue
        values = numpy_helper.to_array(scale).astype(np.float64)
        if not np.all(np.isfinite(values)) or not np.all(values > 0):
            issues.append(LintIssue("positive-scale", label, "scales must be positive and finite (FP16 underflow or a damaged checkpoint)"))
        zp_type = None
        if len(node.input) > 2 and node.input[2]:
            zp = consts.get(node.input[2])
            if zp is None:
                issues.append(LintIssue("constant-zero-point", label, f"zero point {node.input[2]!r} is not constant"))
            else:
                zp_type = zp.data_type
                if np.any(numpy_helper.to_array(zp).astype(np.int64) != 0):
                    issues.append(LintIssue("zero-point", label, "TensorRT needs symmetric quantization: zero point must be 0"))
        if zp_type == onnx.TensorProto.UINT8 or (node.op_type == "DequantizeLinear" and consts.get(node.input[0]) is not None
                                                  and consts[node.input[0]].data_type == onnx.TensorProto.UINT8):
            issues.append(LintIssue("int8-type", label, "uint8 Q/DQ is not supported by TensorRT; use int8"))
        per_channel = values.size > 1
        data = node.input[0]
        is_weight = node.op_type == "DequantizeLinear" and data in consts
        if per_channel and not is_weight:
            issues.append(LintIssue("per-channel-activation", label, "per-channel scales only on constant (weight) inputs"))
        int4 = zp_type in INT4_TYPES or (is_weight and consts[data].data_type in INT4_TYPES)
        readers = consumers.get(node.output[0], [])
        if int4:
            if opset < 21:
                issues.append(LintIssue("opset", label, f"INT4 needs opset 21, graph has {opset}"))
            if not is_weight or any(r.op_type not in ("MatMul", "Gemm") for r in readers):
                issues.append(LintIssue("int4-weight-only", label, "INT4 only on MatMul/Gemm weights (block-quantized)"))
        if per_channel and is_weight and not int4:
            axis = _attr(node, "axis", 1)
            for reader in readers:
                expected = 0 if reader.op_type == "Conv" else 1 if reader.op_type in ("MatMul", "Gemm") else None
                if expected is not None and axis != expected:
                    issues.append(LintIssue("channel-axis", label, f"per-channel axis {axis} is not the output-channel axis {expected} of {reader.op_type}"))
    return issues


RULES = {"tensorrt": lint_tensorrt}  # TargetProfile.graph_rules -> the checker of that rule set


def lint(model: onnx.ModelProto, rules: str) -> list[LintIssue]:
    """The problems of ``model`` under the named rule set ("" checks nothing)."""
    return RULES[rules](model) if rules else []
