"""Each export pass on its own: rescaling identity, timestep lookup subgraph, constant folding, lint rules."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quest.quantizers import quantize_codes
from quest.timesteps import TimestepContext, uniform_group_lookup
from quest_export.export.lint import lint_tensorrt
from quest_export.export.parity import ort_session
from quest_export.export.passes import fold_constants
from quest_export.export.timestep_tables import TimestepGroups, reference_scale, rescale_factors


def test_rescaling_gives_the_codes_of_the_per_timestep_scale() -> None:
    table = np.array([0.013, 0.021, 0.034, 0.055], np.float32)
    s0 = reference_scale(table)
    factors = rescale_factors(table, s0)
    x = torch.randn(4, 20000) * 2
    for g in range(4):
        want = quantize_codes(x[g], torch.tensor(float(table[g])), torch.tensor(0.0), -128, 127)
        got = quantize_codes(x[g] * float(factors[g]), torch.tensor(s0), torch.tensor(0.0), -128, 127)
        assert (got == want).float().mean() > 0.9999


def test_group_subgraph_maps_any_timestep_like_the_simulation() -> None:
    lookup = uniform_group_lookup(7, 1000).numpy()
    t_in = gs.Variable("timestep", np.float32, ["b"])
    graph = gs.Graph(inputs=[t_in], opset=21)
    groups = TimestepGroups(graph, lookup).groups()
    graph.outputs = [groups]
    model = gs.export_onnx(graph)
    model.ir_version = 10
    t = np.array([0, 0.4, 142.5, 143.5, 500.2, 998.7, 999, 1200, -3], np.float32)
    got = ort_session(model, optimize=False).run(None, {"timestep": t})[0]
    context = TimestepContext(torch.from_numpy(lookup))
    want = context.group_of(torch.from_numpy(t), len(t)).numpy()
    assert got.tolist() == want.tolist()


def _qdq_weight_model(scale: np.ndarray, zero_point: np.ndarray, axis: int = 0, op: str = "Conv",
                      activation_scale: np.ndarray | None = None, act_zp_type=np.int8, opset: int = 21) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1) if op == "Conv" else (3, 4), np.int8), "w")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dq_w", axis=axis),
        helper.make_node(op, ["xd", "wd"], ["y"], name="op"),
    ]
    inits = [w, numpy_helper.from_array(scale.astype(np.float32), "ws"), numpy_helper.from_array(zero_point, "wz"),
             numpy_helper.from_array(activation_scale if activation_scale is not None else np.array(0.1, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, act_zp_type), "xz")]
    shape = [1, 3, 2, 2] if op == "Conv" else [2, 3]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_lint_accepts_a_clean_graph() -> None:
    assert lint_tensorrt(_qdq_weight_model(np.full(4, 0.1), np.zeros(4, np.int8))) == []
    assert lint_tensorrt(_qdq_weight_model(np.full(4, 0.1), np.zeros(4, np.int8), axis=1, op="MatMul")) == []


@pytest.mark.parametrize(
    ("rule", "kwargs"),
    [
        ("zero-point", {"zero_point": np.array([0, 1, 0, 0], np.int8)}),
        ("positive-scale", {"scale": np.array([0.1, 0.0, 0.1, 0.1])}),
        ("positive-scale", {"scale": np.array([0.1, -0.2, 0.1, 0.1])}),
        ("per-channel-activation", {"activation_scale": np.array([0.1, 0.2, 0.3], np.float32)}),
        ("channel-axis", {"axis": 1}),
        ("int8-type", {"act_zp_type": np.uint8}),
        ("opset", {"opset": 17}),
    ],
)
def test_lint_rejects_each_rule_violation(rule: str, kwargs: dict) -> None:
    args = {"scale": np.full(4, 0.1), "zero_point": np.zeros(4, np.int8)}
    args.update(kwargs)
    issues = lint_tensorrt(_qdq_weight_model(**args))
    assert rule in {i.rule for i in issues}, issues


def test_lint_rejects_non_constant_scales_and_int4_off_matmul() -> None:
    model = _qdq_weight_model(np.full(4, 0.1), np.zeros(4, np.int8))
    model.graph.input.append(helper.make_tensor_value_info("dyn", TensorProto.FLOAT, []))
    model.graph.node[0].input[1] = "dyn"
    assert "constant-scale" in {i.rule for i in lint_tensorrt(model)}
    int4 = _qdq_weight_model(np.full(4, 0.1), np.zeros(4, np.int8))
    int4.graph.initializer[0].CopyFrom(helper.make_tensor("w", TensorProto.INT4, [4, 3, 1, 1], np.ones(12, np.int8).tolist()))
    assert "int4-weight-only" in {i.rule for i in lint_tensorrt(int4)}


def test_constant_folding_keeps_weight_dequantization() -> None:
    model = _qdq_weight_model(np.full(4, 0.1), np.zeros(4, np.int8))
    # a foldable shape computation next to the weight DQ
    extra = [helper.make_node("Shape", ["w"], ["ws_shape"]), helper.make_node("Cast", ["ws_shape"], ["ws_f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["ws_f"], ["ws_sum"], keepdims=0), helper.make_node("Add", ["y", "ws_sum"], ["y2"])]
    model.graph.node.extend(extra)
    model.graph.output[0].name = "y2"
    folded = fold_constants(model)
    ops = [n.op_type for n in folded.graph.node]
    assert "Shape" not in ops and ops.count("DequantizeLinear") == 2
    w = next(i for i in folded.graph.initializer if i.name == "w")
    assert w.data_type == TensorProto.INT8
