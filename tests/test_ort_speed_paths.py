"""The ONNX Runtime CPU speed paths: fused attention for FP32 and quantized engines alike, float
attention in the onnxruntime profile (and so in its simulation), Linear layers read by Gemm exported
as MatMul so they run as MatMulIntegerToFloat."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from quest.profiles import ONNXRUNTIME, TENSORRT
from quest.quantize import quantize_unet
from quest.recipe import Recipe


class _SDPABlock(nn.Module):
    """A diffusers-style attention block (projections, split heads, default-scale SDPA, merge)."""

    def __init__(self, dim: int = 32, heads: int = 4, context: int = 24) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(context, dim), nn.Linear(context, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        head_dim = q.shape[-1] // self.heads
        q, k, v = (t.view(b, -1, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, -1, self.heads * head_dim)


def _export(module: nn.Module, args: tuple, path: Path) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=["x", "ctx"],
                          output_names=["y"], dynamic_axes={"x": {0: "b", 1: "s"}, "ctx": {0: "b", 1: "t"}})
    return onnx.load(str(path))


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_sdpa_blocks_fuse_into_multi_head_attention_with_the_same_result(tmp_path: Path) -> None:
    from quest_export.engine.ort_fusions import fuse_attention

    torch.manual_seed(0)
    block = _SDPABlock().eval()
    x, ctx = torch.randn(2, 16, 32), torch.randn(2, 5, 24)
    model = _export(block, (x, ctx), tmp_path / "attn.onnx")
    fused, count = fuse_attention(model)
    assert count == 1
    ops = [n.op_type for n in fused.graph.node]
    assert "MultiHeadAttention" in ops and "Softmax" not in ops
    feeds = {"x": x.numpy(), "ctx": ctx.numpy()}
    with torch.no_grad():
        reference = block(x, ctx).numpy()
    np.testing.assert_allclose(_run(fused, feeds), reference, atol=1e-5)
    np.testing.assert_allclose(_run(model, feeds), reference, atol=1e-5)


def test_attention_with_a_custom_scale_is_left_alone(tmp_path: Path) -> None:
    from quest_export.engine.ort_fusions import fuse_attention

    class Scaled(_SDPABlock):
        def forward(self, x, ctx):
            b = x.shape[0]
            q, k, v = (t.view(b, -1, self.heads, 8).transpose(1, 2) for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx)))
            out = nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
            return out.transpose(1, 2).reshape(b, -1, 32)

    model = _export(Scaled().eval(), (torch.randn(2, 16, 32), torch.randn(2, 5, 24)), tmp_path / "scaled.onnx")
    assert fuse_attention(model)[1] == 0


def test_onnxruntime_profile_runs_attention_in_float_and_tensorrt_quantizes_it() -> None:
    from quest.modules import QuantAttnProcessor
    from quest_export.models.digits.unet import build_digits_unet

    assert not ONNXRUNTIME.attention_quantizers and TENSORRT.attention_quantizers
    for target, expected in (("onnxruntime", False), ("tensorrt", True)):
        unet = build_digits_unet().eval()
        q = quantize_unet(unet, Recipe(target=target, timestep_groups=2))
        procs = [m.processor for m in unet.modules() if hasattr(m, "processor")]
        assert procs and any(isinstance(p, QuantAttnProcessor) for p in procs) == expected
        assert ("attention" in {i.kind for i in q.layers.values()}) == expected
        assert any("probs_quantizer" in n for n, _ in q.activation_quantizers()) == expected


@pytest.mark.parametrize("bias", [True, False])
def test_quantized_gemm_becomes_matmul_for_onnxruntime(bias: bool) -> None:
    import onnx_graphsurgeon as gs

    from quest.quantizers import WeightQuantizer
    from quest_export.export.qdq import QDQBuilder

    weight = gs.Constant("w", np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32))
    x = gs.Variable("x", np.float32, (2, 4))
    y = gs.Variable("y", np.float32, (2, 6))
    marked = gs.Variable("w_marked", np.float32)
    inputs = [x, marked] + ([gs.Constant("b", np.arange(6, dtype=np.float32))] if bias else [])
    graph = gs.Graph(nodes=[gs.Node("Identity", name="mark", inputs=[weight], outputs=[marked]),
                            gs.Node("Gemm", name="fc", inputs=inputs, outputs=[y], attrs={"transB": 1})],
                     inputs=[x], outputs=[y])
    quantizer = _calibrated(WeightQuantizer(ONNXRUNTIME.weight_spec(8), 6), weight.values)
    builder = QDQBuilder(graph, {}, ONNXRUNTIME, np.zeros(1000, np.int64), {})
    x_values = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    builder.weight(graph.nodes[0], "fc.weight_quantizer", quantizer)
    graph.cleanup().toposort()
    ops = [n.op for n in graph.nodes]
    assert "Gemm" not in ops and "MatMul" in ops and ("Add" in ops) == bias
    model = gs.export_onnx(graph)
    model.ir_version = 10
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", 21)])
    got = _run(model, {"x": x_values})
    dequantized = quantizer.codes(torch.from_numpy(weight.values)).float() * quantizer.scale.detach().reshape(-1, 1)
    expected = x_values @ dequantized.numpy().T + (np.arange(6, dtype=np.float32) if bias else 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert builder.records[0].transposed


def _calibrated(quantizer, weight: np.ndarray):
    with torch.no_grad():
        amax = torch.from_numpy(np.abs(weight).max(axis=1)).float()
        quantizer.scale.copy_(amax / quantizer.spec.qmax)
    return quantizer
