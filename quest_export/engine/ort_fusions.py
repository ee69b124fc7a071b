"""Graph fusions ONNX Runtime's own optimizer misses on exported diffusers UNets.

:func:`fuse_attention` turns the traced ``scaled_dot_product_attention`` of every diffusers
attention block (float q/k/v, default scale) into one ``com.microsoft.MultiHeadAttention`` node, the
CPU execution provider's fused attention kernel. ORT's graph optimizer does not match this pattern
(its transformer optimizer's UNet fusion needs static shapes), so without this pass attention runs as
MatMul -> Softmax -> MatMul over the full (batch, heads, S, S) score tensor.

It is float-only and changes no quantized tensor: it applies to the FP32 baseline engine and the
quantized engine alike (the bench compares both with it), and a block whose q, k or v is quantized
(Q/DQ between the projection and the attention) is left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from quest_export.export import passes

MS_DOMAIN = "com.microsoft"


def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    if not tensor.inputs:
        return None
    node = tensor.inputs[0]
    return node if node.op == op else None


def _only_reader(tensor: gs.Tensor, op: str) -> gs.Node | None:
    readers = [n for n in tensor.outputs if n.op != "Shape"]
    return readers[0] if len(readers) == 1 and readers[0].op == op else None


def _perm(node: gs.Node | None, perm: list[int]) -> bool:
    return node is not None and list(node.attrs.get("perm", [])) == perm


def _value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or of a ``Constant`` node's output; None for computed tensors."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = _producer(tensor, "Constant")
    if node is not None and isinstance(node.attrs.get("value"), gs.Constant):
        return np.asarray(node.attrs["value"].values)
    return None


def _heads(reshape: gs.Node) -> int | None:
    """Heads of a ``Reshape(x, [B, -1, heads, head_dim])`` (the shape a Concat with the heads constant)."""
    shape = reshape.inputs[1]
    values = _value(shape)
    if values is not None:
        values = values.reshape(-1)
        return int(values[2]) if values.size == 4 and values[2] > 0 else None
    concat = _producer(shape, "Concat")
    if concat is None or len(concat.inputs) != 4:
        return None
    value = _value(concat.inputs[2])
    if value is None or value.size != 1:
        return None
    return int(value.reshape(-1)[0]) if value.reshape(-1)[0] > 0 else None


def _default_scale(tensor: gs.Tensor) -> bool:
    """``sqrt(1 / sqrt(head_dim))`` computed from the query's shape: SDPA's default scale, split on q and k."""
    root = _producer(tensor, "Sqrt")
    div = _producer(root.inputs[0], "Div") if root is not None else None
    if div is None and root is not None:  # a Cast between Div and Sqrt
        cast = _producer(root.inputs[0], "Cast")
        div = _producer(cast.inputs[0], "Div") if cast is not None else None
    one = _value(div.inputs[0]) if div is not None else None
    if one is None or one.size != 1 or not np.allclose(one.astype(np.float64), 1.0):
        return False
    return _producer(div.inputs[1], "Sqrt") is not None


def _split_heads(x: gs.Tensor, perm: list[int]) -> tuple[gs.Tensor, int] | None:
    """``Transpose(Reshape(x3d, [B, -1, N, H]), perm)`` -> (x3d, N)."""
    transpose = _producer(x, "Transpose")
    if not _perm(transpose, perm):
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    if reshape is None:
        return None
    heads = _heads(reshape)
    return (reshape.inputs[0], heads) if heads else None


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Every default-scale SDPA block -> ``MultiHeadAttention``; returns the model and the count."""
    graph = gs.import_onnx(model)
    fused = 0
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        if int(softmax.attrs.get("axis", -1)) not in (-1, 3):
            continue
        scores = _producer(softmax.inputs[0], "MatMul")
        mix = _only_reader(softmax.outputs[0], "MatMul")
        if scores is None or mix is None or mix.inputs[0] is not softmax.outputs[0]:
            continue
        q_mul, k_mul = _producer(scores.inputs[0], "Mul"), _producer(scores.inputs[1], "Mul")
        if q_mul is None or k_mul is None or not (_default_scale(q_mul.inputs[1]) and _default_scale(k_mul.inputs[1])):
            continue
        q = _split_heads(q_mul.inputs[0], [0, 2, 1, 3])
        k = _split_heads(k_mul.inputs[0], [0, 2, 3, 1])
        v = _split_heads(mix.inputs[1], [0, 2, 1, 3])
        merge = _only_reader(mix.outputs[0], "Transpose")
        if not (q and k and v) or not _perm(merge, [0, 2, 1, 3]) or len({q[1], k[1], v[1]}) != 1:
            continue
        reshape_out = _only_reader(merge.outputs[0], "Reshape")
        if reshape_out is None:
            continue
        out = reshape_out.outputs[0]
        reshape_out.outputs.clear()
        graph.layer(op="MultiHeadAttention", name=f"{softmax.name}/MultiHeadAttention", domain=MS_DOMAIN,
                    inputs=[q[0], k[0], v[0]], outputs=[out], attrs={"num_heads": q[1]})
        fused += 1
    if not fused:
        return model, 0
    graph.cleanup().toposort()
    opsets = [*[op for op in model.opset_import if op.domain != MS_DOMAIN], onnx.helper.make_opsetid(MS_DOMAIN, 1)]
    out_model = passes.to_model(graph, opsets, ir_version=model.ir_version)
    return out_model, fused


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


# ORT's MatMulAddFusion (level 1) turns a 2-D ``MatMul(DQ(x), DQ(W)) + bias`` into a float ``Gemm`` before
# its Q/DQ fusions run (level 2), so the time-embedding projections would dequantize their weights on
# every call instead of running as MatMulIntegerToFloat. Disabled for Q/DQ graphs only (the FP32
# engine keeps it).
QDQ_DISABLED_OPTIMIZERS = ("MatMulAddFusion",)


@contextmanager
def prepared(onnx_path: Path, scratch: Path) -> Iterator[tuple[Path, list[str], dict[str, int]]]:
    """The graph ORT should optimise (attention fused, written to ``scratch`` when changed and removed
    on exit), the ORT optimizers to disable for it, and what was done."""
    model = onnx.load(str(onnx_path))
    disabled = list(QDQ_DISABLED_OPTIMIZERS) if has_qdq(model) else []
    model, attention = fuse_attention(model)
    if not attention:
        yield Path(onnx_path), disabled, {"multi_head_attention": 0}
        return
    from quest_export.onnx_io import graph_files, save_graph

    target = Path(scratch) / ".fused.onnx"
    try:
        save_graph(model, target)  # external data past 2 GB
        del model
        yield target, disabled, {"multi_head_attention": attention}
    finally:
        for path in graph_files(target):
            path.unlink(missing_ok=True)
