"""Each export pass on its own: rescaling identity, timestep lookup subgraph, constant folding, lint rules."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quest.quantizers import ActivationQuantizer, graph_scale_table, quantize_codes
from quest.profiles import TENSORRT
from quest.timesteps import TimestepContext, uniform_group_lookup
from quest_export.export.lint import lint_tensorrt
from quest_export.export.parity import ort_session
from quest_export.export.passes import fold_constants, to_fp16
from quest_export.export.timestep_tables import TimestepGroups


def test_rescaling_gives_the_codes_of_the_per_timestep_scale() -> None:
    table = torch.tensor([0.013, 0.021, 0.034, 0.055])
    s0, factors, effective = graph_scale_table(table, "fp32")
    assert torch.equal(effective, table)
    x = torch.randn(4, 20000) * 2
    for g in range(4):
        want = quantize_codes(x[g], table[g], torch.tensor(0.0), -128, 127)
        got = quantize_codes(x[g] * factors[g], s0, torch.tensor(0.0), -128, 127)
        assert (got == want).float().mean() > 0.9999


def test_fp16_graph_scales_are_fp16_numbers_and_the_simulation_uses_their_quotient() -> None:
    """In an FP16 graph s0 and f are FP16 numbers: the simulation's scale is s0 / f, not the table,
    and on large codes that is what makes FP16 x * f -> Q(s0) agree with it."""
    table = torch.tensor([0.0131, 0.0217, 0.0342, 0.0551])
    s0, factors, effective = graph_scale_table(table, "fp16")
    assert float(s0) == float(s0.half()) and torch.equal(factors, factors.half().float())
    assert torch.allclose(effective, s0 / factors) and not torch.equal(effective, table)
    assert torch.allclose(effective, table, rtol=2**-10)
    quantizer = ActivationQuantizer(TENSORRT.activation_spec(8), num_groups=4)
    assert quantizer.spec.scale_precision == "fp16"
    with torch.no_grad():
        quantizer.scale.copy_(table)
    assert torch.equal(quantizer.graph_table(), effective)
    # the engine's arithmetic on an FP16 input (as parity feeds it), near the top of the grid where
    # a scale error moves most codes: x * f rounds to FP16, then Q(s0)
    x = ((torch.rand(4, 20000) * 120 + 5) * table[:, None]).half().float()
    engine = torch.round((x.half() * factors[:, None].half()).float() / s0).clamp(-128, 127)
    simulated = quantize_codes(x, effective[:, None], torch.tensor(0.0), -128, 127)
    unrounded = quantize_codes(x, table[:, None], torch.tensor(0.0), -128, 127)
    agree, before = (engine == simulated).float().mean(1), (engine == unrounded).float().mean(1)
    assert bool((agree > 0.985).all()) and agree.mean() > before.mean() + 0.003
    # one group: no factor, Q(s0) with the FP16 scale is exactly what the simulation computes
    for value in (0.0131, 0.019323980435729027, 3.3e-3):  # one entry: no factor, the FP16 scale itself
        one, factor, scale = graph_scale_table(torch.tensor([value]), "fp16")
        assert float(factor) == 1.0 and float(scale) == float(one) == float(torch.tensor(value).half())
    single, _, single_effective = graph_scale_table(table[:1], "fp16")
    codes = torch.round(x[0] / single).clamp(-128, 127)
    assert torch.equal(codes, quantize_codes(x[0], single_effective, torch.tensor(0.0), -128, 127))
    assert not torch.equal(codes, quantize_codes(x[0], table[0], torch.tensor(0.0), -128, 127))


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


def _timestep_embedding_model() -> onnx.ModelProto:
    """timestep -> sinusoid (time_proj) -> Cast -> time_embedding MatMul -> added to the sample path."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, 8)).astype(np.float32), "freqs"),
             numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w_emb"),
             numpy_helper.from_array(np.float32(0.5), "half")]
    nodes = [helper.make_node("Unsqueeze", ["timestep", "axes"], ["t2"], name="/unet/time_proj/Unsqueeze"),
             helper.make_node("Mul", ["t2", "freqs"], ["phase"], name="/unet/time_proj/Mul"),
             helper.make_node("Sin", ["phase"], ["sinusoid"], name="/unet/time_proj/Sin"),
             helper.make_node("Cast", ["sinusoid"], ["emb_in"], name="/unet/Cast", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["emb_in", "w_emb"], ["emb"], name="/unet/time_embedding/linear_1/MatMul"),
             helper.make_node("Mul", ["sample", "half"], ["scaled"], name="/unet/conv_in/Mul"),
             helper.make_node("Add", ["scaled", "emb"], ["out_sample"], name="/unet/down_blocks.0/Add")]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [2, 4]),
                                             helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_fp16_keeps_the_timestep_embedding_fp32_without_round_trips() -> None:
    model = _timestep_embedding_model()
    converted = to_fp16(model)
    onnx.checker.check_model(converted)
    by_name = {n.name: n for n in converted.graph.node}
    inits = {i.name: i for i in converted.graph.initializer}
    # the embedding's weights and frequencies stay FP32, the sample path's constant becomes FP16
    assert inits["w_emb"].data_type == TensorProto.FLOAT and inits["freqs"].data_type == TensorProto.FLOAT
    assert inits["half"].data_type == TensorProto.FLOAT16
    # the embedding reads the sinusoid directly (no FP16 Cast in between) and one Cast joins the FP16 path
    assert by_name["/unet/time_embedding/linear_1/MatMul"].input[0] == "emb_in"
    assert [a.i for a in by_name["/unet/Cast"].attribute if a.name == "to"] == [TensorProto.FLOAT]
    assert by_name["/unet/down_blocks.0/Add"].input[1] == "emb.fp16"
    assert by_name["emb/CastFP16"].op_type == "Cast"
    feeds = {"sample": np.ones((2, 4), np.float32), "timestep": np.array([999.0, 37.5], np.float32)}
    expected = ort_session(model, optimize=False).run(None, feeds)[0]
    got = ort_session(converted, optimize=False).run(None, feeds)[0]
    # phases up to ~1500 rad: an FP16 sinusoid would be off by O(1); FP32 keeps it to FP16 output rounding
    np.testing.assert_allclose(got, expected, atol=2e-2, rtol=2e-3)


def test_parity_accepts_rounding_ties_and_refuses_other_code_differences() -> None:
    from quest_export.export.parity import ParityReport

    def report(diff: int, distance: float, precision: str = "fp32") -> ParityReport:
        tensor = {"name": "conv_out.input_quantizer", "kind": "activation", "bits": 8, "code_agreement": 0.99999,
                  "max_code_diff": diff, "max_tie_distance_steps": distance}
        return ParityReport(min_code_agreement=0.99999, max_abs_error=1e-6, free_running_max_abs_error=0.0,
                            optimized_max_abs_error=None, output_max_abs=1.0, samples=2, timesteps=[0], tensors=[tensor],
                            graph_precision=precision, tie_steps=1e-3 if precision == "fp32" else None)

    assert report(1, 2e-6).passed                      # a float round-off flip at x/s = k + 0.5
    assert not report(1, 0.2).passed                   # an input well inside a step got another code: wrong scale
    assert not report(2, 1e-6).passed                  # two steps off is never a tie
    assert report(1, 0.2, precision="fp16").passed     # FP16 graphs: bounded by the agreement share only


@pytest.mark.parametrize("target", ["tensorrt", "openvino", "onnxruntime"])
def test_float_baseline_graph_keeps_attention_fusable_on_every_target(target: str) -> None:
    """The FP32 graph bench builds its float engines from has diffusers' attention on every target,
    so ONNX Runtime fuses every attention block (the attention-quantizing targets' explicit matmuls
    would leave ORT FP32 unfused: bench-unet 148 vs 117 ms), and it computes what the UNet computes."""
    from diffusers.models.attention_processor import Attention

    from quest.modules import QuantAttnProcessor
    from quest.quantize import quantize_unet
    from quest.recipe import Recipe
    from quest_export.engine.ort_fusions import fuse_attention
    from quest_export.export import trace
    from quest_export.models.digits.unet import build_digits_unet

    torch.manual_seed(0)
    unet = build_digits_unet().eval()
    qunet = quantize_unet(unet, Recipe(weight_bits=8, act_bits=8, target=target))
    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    processors = [type(m.processor) for m in attention]
    inputs = trace.example_inputs(unet, batch=2)
    graph = trace.trace_float_graph(qunet, inputs)
    assert [type(m.processor) for m in attention] == processors  # restored
    assert (QuantAttnProcessor in processors) == (target != "onnxruntime")
    assert not any(n.op_type == "Mark" or n.domain == "quest" for n in graph.graph.node)
    _, fused = fuse_attention(graph)
    assert fused == len(attention) > 0
    for m in unet.modules():  # the float graph is the UNet with every quantizer off
        if hasattr(m, "enabled") and not isinstance(m, torch.nn.Sequential):
            m.enabled = False
    with torch.no_grad():
        expected = unet(*inputs.as_tuple()).sample.numpy()
    got = ort_session(graph, optimize=False).run(None, dict(zip(("sample", "timestep", "encoder_hidden_states"),
                                                                (t.numpy() for t in inputs.as_tuple()))))[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
