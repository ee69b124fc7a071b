"""Replace quantizer markers with the target's Q/DQ nodes.

Weights become integer initializers (codes computed by the simulation's own weight quantizer)
read through ``DequantizeLinear`` with per-output-channel scales. Activations become
``[Mul(f_t)] -> [Clip] -> QuantizeLinear -> DequantizeLinear`` with one constant scale; where the
quantizer has a per-timestep table, the linear op it feeds is followed by ``Mul(1 / f_t)``
(timestep_tables.py). Sub-8-bit activation grids live in 8-bit containers: an exact Clip to the
grid before Q (clipping at ``q * s0`` bounds equals clamping the rounded code).

On targets that accept run-time scales outside the fused kernels (ONNX Runtime), a per-timestep
table is applied without the rescaling Muls: the standalone ``QuantizeLinear`` takes the gathered
per-sample scale ``s_t`` (per-axis on the batch axis, the very ``round(x / s_t)`` of the
simulation), the ``DequantizeLinear`` that the integer kernel fuses keeps the constant ``s0`` (so the
kernel runs in the rescaled domain as before), sub-8-bit grids are clipped on the integer codes, and a
conv's output ``DequantizeLinear`` takes the per-sample ``s_out / f_t`` instead of a ``Mul(1 / f_t)``.
That removes two full passes over every activation per quantized layer (the largest overhead of the
table construction on CPU, measured on digits).

A quantizer the target cannot express is refused here with a clear message, never changed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from quest.profiles import TargetProfile
from quest.quantizers import ActivationQuantizer, TiedOutputQuantizer, WeightQuantizer, graph_scale_table
from quest_export.errors import UserError
from quest_export.export.markers import MARK_DOMAIN, MARK_OP
from quest_export.export.passes import redirect, to_model
from quest_export.export.timestep_tables import TimestepGroups

LINEAR_OPS = ("Conv", "MatMul", "Gemm", "ConvTranspose")
LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")




def _plain_gemm(node: gs.Node, weight: gs.Tensor) -> bool:
    """``Gemm(x, W, [b])`` with ``W`` as the transposed second input and no alpha/beta scaling."""
    attrs = node.attrs
    return (node.op == "Gemm" and len(node.inputs) >= 2 and node.inputs[1] is weight and node.inputs[0] is not weight
            and int(attrs.get("transB", 0)) == 1 and int(attrs.get("transA", 0)) == 0
            and float(attrs.get("alpha", 1.0)) == 1.0 and float(attrs.get("beta", 1.0)) == 1.0)


class ExportError(UserError):
    """The checkpoint cannot be expressed on the requested target."""


@dataclass
class QuantizedTensor:
    """One quantized tensor of the exported graph (the manifest's and parity report's unit)."""

    name: str  # quantizer module name in the torch model
    kind: str  # weight | activation | output
    bits: int
    signed: bool
    granularity: str  # per-channel | per-tensor
    storage: str  # int8 | uint8 | int4
    timestep_groups: int = 1
    codes: str = ""  # graph tensor holding the integer codes (QuantizeLinear output / weight initializer)
    consumers: list[str] = field(default_factory=list)
    source: str = ""  # graph tensor the quantizer reads (the simulation quantizer's input)
    source_factors: list[float] | None = None  # per group: source tensor * factor = the simulation's input
    transposed: bool = False  # weight codes stored transposed (a Linear read by MatMul as (in, out))

    def to_dict(self) -> dict:
        return asdict(self)


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor, by ONNX shape inference with markers read as Identity."""
    from quest_export.onnx_io import infer_shapes, structure

    copy = structure(model)  # no weight data: cheap at any size
    for node in copy.graph.node:
        if node.domain == MARK_DOMAIN and node.op_type == MARK_OP:
            node.domain, node.op_type = "", "Identity"
            del node.attribute[:]
    inferred = infer_shapes(copy, strict_mode=False)
    ranks: dict[str, int] = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            ranks[info.name] = len(tensor_type.shape.dim)
    return ranks


class QDQBuilder:
    """Rewrites one marked graph for one target profile."""

    def __init__(self, graph: gs.Graph, quantizers: dict[str, nn.Module], profile: TargetProfile,
                 lookup: np.ndarray, ranks: dict[str, int]) -> None:
        self.graph = graph
        self.quantizers = quantizers
        self.profile = profile
        self.ranks = ranks
        self.groups = TimestepGroups(graph, lookup)
        self.records: list[QuantizedTensor] = []
        self._inverse: dict[str, list[np.ndarray]] = {}  # linear node name -> factor tables of its inputs
        self._linear_nodes: dict[str, gs.Node] = {}
        self._output_markers: dict[str, gs.Variable] = {}  # linear node name -> output DQ variable
        self._output_dq: dict[str, tuple[gs.Node, float, float]] = {}  # linear node -> (output DQ, scale, zero point)
        self.runtime_scales = profile.runtime_scales
        self._per_sample_zero_points: dict[tuple[float, str, int], gs.Variable] = {}

    # -- helpers -------------------------------------------------------------------------------
    def _const(self, name: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(name, np.ascontiguousarray(value))

    def _zero_point(self, name: str, value: float, signed: bool) -> gs.Constant:
        if value != round(value):
            raise ExportError(f"{name}: zero point {value} is not an integer; the checkpoint is damaged")
        dtype = np.int8 if signed else np.uint8
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise ExportError(f"{name}: zero point {value} does not fit {dtype.__name__}")
        return self._const(f"{name}.zero_point", np.array(int(value), dtype))

    def _qdq(self, name: str, x: gs.Tensor, out: gs.Variable, scale: float, zero_point: float, spec) -> str:
        """``x -> [Clip] -> Q -> DQ -> out``; returns the codes tensor name."""
        g = self.graph
        if not scale > 0 or not np.isfinite(scale):
            raise ExportError(f"{name}: scale {scale} is not a positive finite number; the checkpoint is damaged")
        scale_c = self._const(f"{name}.scale", np.array(scale, np.float32))
        zp = self._zero_point(name, zero_point, spec.signed)
        container = np.iinfo(np.int8 if spec.signed else np.uint8)
        if spec.qmin > container.min or spec.qmax < container.max:
            lo = np.float32((spec.qmin - zero_point) * np.float32(scale))
            hi = np.float32((spec.qmax - zero_point) * np.float32(scale))
            x = g.layer(op="Clip", name=f"{name}/Clip", inputs=[x, self._const(f"{name}.lo", np.array(lo)),
                        self._const(f"{name}.hi", np.array(hi))], outputs=[gs.Variable(f"{name}.clipped")])[0]
        codes = gs.Variable(f"quest_codes/{name}", np.int8 if spec.signed else np.uint8)
        g.layer(op="QuantizeLinear", name=f"{name}/Q", inputs=[x, scale_c, zp], outputs=[codes])
        g.layer(op="DequantizeLinear", name=f"{name}/DQ", inputs=[codes, scale_c, zp], outputs=[out])
        return codes.name

    def _per_sample_zero_point(self, value: float, dtype: np.dtype, groups: int) -> gs.Variable:
        """A zero point repeated per sample (per-axis Q/DQ need one per scale), shared by every
        quantizer with that value: one Gather each instead of one per quantizer."""
        key = (float(value), np.dtype(dtype).name, int(groups))
        if key not in self._per_sample_zero_points:
            name = f"quest_zero_point_{np.dtype(dtype).name}_{int(value)}_of_{int(groups)}"
            self._per_sample_zero_points[key] = self.groups.per_sample(name, np.full(groups, value, dtype))
        return self._per_sample_zero_points[key]

    def _runtime_qdq(self, name: str, x: gs.Tensor, out: gs.Variable, table: np.ndarray, s0: float,
                     zero_point: float, spec) -> str:
        """``x -> Q(s_t per sample) -> [integer Clip] -> DQ(s0) -> out``; returns the codes tensor name."""
        zp = self._zero_point(name, zero_point, spec.signed)
        dtype = zp.values.dtype
        scale_t = self.groups.per_sample(f"{name}.timestep_scale", table.astype(np.float32))
        zp_t = self._per_sample_zero_point(zero_point, dtype, table.size)
        container = np.iinfo(dtype)
        clipped = spec.qmin > container.min or spec.qmax < container.max
        final = gs.Variable(f"quest_codes/{name}", dtype)
        codes = gs.Variable(f"{name}.unclipped_codes", dtype) if clipped else final
        self.graph.layer(op="QuantizeLinear", name=f"{name}/Q", inputs=[x, scale_t, zp_t], outputs=[codes],
                         attrs={"axis": 0})
        if clipped:
            self.graph.layer(op="Clip", name=f"{name}/ClipCodes", inputs=[
                codes, self._const(f"{name}.qmin", np.array(spec.qmin, dtype)),
                self._const(f"{name}.qmax", np.array(spec.qmax, dtype))], outputs=[final])
        self.graph.layer(op="DequantizeLinear", name=f"{name}/DQ", inputs=[final, self._const(f"{name}.scale", np.array(s0, np.float32)), zp],
                         outputs=[out])
        return final.name

    def _table(self, quantizer: ActivationQuantizer) -> tuple[np.ndarray, float, np.ndarray]:
        """``(table, s0, factors)``: the constant scale and per-group factors the graph stores,
        from the same definition the simulation quantizes with (quest.quantizers.graph_scale_table)."""
        table = quantizer.scale.detach().double().cpu().numpy()
        if not np.all(np.isfinite(table)) or not np.all(table > 0):
            raise ExportError(f"activation scales {table.tolist()} are not all positive and finite; the checkpoint is damaged")
        s0, factors, _ = graph_scale_table(quantizer.scale.detach().cpu(), quantizer.spec.scale_precision)
        return table, float(s0), factors.numpy().astype(np.float32)

    def _linear_consumers(self, start: gs.Variable, name: str) -> list[gs.Node]:
        """The Conv/MatMul/Gemm nodes a rescaled activation reaches through layout-only ops."""
        found, frontier, seen = [], [start], set()
        while frontier:
            var = frontier.pop()
            for node in var.outputs:
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if node.op in LINEAR_OPS:
                    found.append(node)
                elif node.op in LAYOUT_OPS and node.inputs[0] is var:
                    frontier.extend(node.outputs)
                elif node.op in ("Shape",) or (node.op in LAYOUT_OPS and node.inputs[0] is not var):
                    continue  # reads only the shape
                else:
                    raise ExportError(
                        f"{name}: its per-timestep scale cannot be expressed on this graph (the value reaches "
                        f"{node.op} before a linear op); export with one timestep group or use --timestep-scales per-engine"
                    )
        if not found:
            raise ExportError(f"{name}: quantized tensor feeds no Conv/MatMul/Gemm")
        return found

    def _gemm_to_matmul(self, gemm: gs.Node) -> None:
        """``Gemm(x, W, b, transB=1)`` -> ``MatMul(x, W^T) [+ b]`` in place (same arithmetic). ONNX Runtime
        fuses ``DQ -> MatMul`` into ``MatMulIntegerToFloat``; a ``Gemm`` with a float bias stays a float
        Gemm that dequantizes its weight on every call."""
        bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
        result = gemm.outputs[0]
        gemm.op, gemm.attrs = "MatMul", {}
        while len(gemm.inputs) > 2:
            gemm.inputs.pop()
        if bias is not None and not (isinstance(bias, gs.Constant) and not np.any(bias.values)):
            product = gs.Variable(f"{result.name}.matmul")
            self.ranks[product.name] = self.ranks.get(result.name, 2)  # a per-timestep unscale goes before the bias
            gemm.outputs[0] = product
            self.graph.layer(op="Add", name=f"{gemm.name}/bias", inputs=[product, bias], outputs=[result])

    # -- markers -------------------------------------------------------------------------------
    def weight(self, node: gs.Node, name: str, quantizer: WeightQuantizer) -> None:
        source, out = node.inputs[0], node.outputs[0]
        if not isinstance(source, gs.Constant):
            raise ExportError(f"{name}: weight is not a constant initializer")
        weight = torch.from_numpy(np.array(source.values, dtype=np.float32))
        codes = quantizer.codes(weight).numpy().astype(np.int8)
        scales = quantizer.graph_scale().detach().float().cpu().numpy()
        if not np.all(scales > 0) or not np.all(np.isfinite(scales)):
            raise ExportError(f"{name}: weight scales are not all positive and finite; the checkpoint is damaged")
        axis = 0
        node.inputs.clear()
        node.outputs.clear()
        readers = list(out.outputs)
        if len(readers) == 1 and readers[0].op == "Transpose" and list(readers[0].attrs.get("perm", [])) == [1, 0]:
            transpose = readers[0]
            codes, axis = codes.T, 1  # fold the Linear's transpose into the integer initializer
            out = transpose.outputs[0]
            transpose.inputs.clear()
            transpose.outputs.clear()
        elif len(readers) == 1 and self.profile.gemm_as_matmul and _plain_gemm(readers[0], out):
            codes, axis = codes.T, 1  # Gemm(transB=1) -> MatMul(x, W^T) + bias: fuses as MatMulIntegerToFloat
            self._gemm_to_matmul(readers[0])
        codes_c = self._const(f"quest_codes/{name}", codes)
        zp = self._const(f"{name}.zero_point", np.zeros(scales.shape, np.int8))
        self.graph.layer(op="DequantizeLinear", name=f"{name}/DQ", inputs=[codes_c, self._const(f"{name}.scale", scales), zp],
                         outputs=[out], attrs={"axis": axis})
        self.records.append(QuantizedTensor(name, "weight", quantizer.spec.bits, True, "per-channel", "int8",
                                            codes=codes_c.name, consumers=[n.name for n in out.outputs],
                                            transposed=axis == 1))

    def activation(self, node: gs.Node, name: str, quantizer: ActivationQuantizer) -> None:
        x, out = node.inputs[0], node.outputs[0]
        source = x.name
        node.inputs.clear()
        node.outputs.clear()
        table, s0, factors = self._table(quantizer)
        if table.size > 1 and self.runtime_scales:
            codes = self._runtime_qdq(name, x, out, table, s0, float(quantizer.zero_point), quantizer.spec)
        elif table.size > 1:
            rank = self.ranks.get(out.name)
            if rank is None:
                raise ExportError(f"{name}: cannot infer the rank of its tensor")
            factor = self.groups.factor(factors, rank, f"{name}.timestep_factor")
            x = self.graph.layer(op="Mul", name=f"{name}/Rescale", inputs=[x, factor],
                                 outputs=[gs.Variable(f"{name}.rescaled")])[0]
            codes = self._qdq(name, x, out, s0, float(quantizer.zero_point), quantizer.spec)
        else:
            codes = self._qdq(name, x, out, s0, float(quantizer.zero_point), quantizer.spec)
        consumers = self._linear_consumers(out, name)
        if table.size > 1:
            for linear in consumers:
                self._inverse.setdefault(linear.name, []).append(factors)
                self._linear_nodes[linear.name] = linear
        self.records.append(QuantizedTensor(
            name, "activation", quantizer.spec.bits, quantizer.spec.signed, "per-tensor",
            "int8" if quantizer.spec.signed else "uint8", int(table.size), codes, [n.name for n in consumers], source))

    def output(self, node: gs.Node, name: str, quantizer: TiedOutputQuantizer) -> None:
        y, out = node.inputs[0], node.outputs[0]
        producer = y.inputs[0] if y.inputs else None
        if producer is None or producer.op not in LINEAR_OPS:
            raise ExportError(f"{name}: output quantizer does not follow a Conv/MatMul")
        node.inputs.clear()
        node.outputs.clear()
        table, s0, factors = self._table(quantizer.input_quantizer)
        scale = s0 * float(quantizer.log_ratio.detach().exp())
        codes = self._qdq(name, y, out, scale, float(quantizer.zero_point), quantizer.spec)
        self._output_markers[producer.name] = out
        self._output_dq[producer.name] = (out.inputs[0], scale, float(quantizer.zero_point))
        unscale = (1.0 / factors).tolist() if table.size > 1 else None
        self.records.append(QuantizedTensor(
            name, "output", quantizer.spec.bits, quantizer.spec.signed, "per-tensor",
            "int8" if quantizer.spec.signed else "uint8", int(table.size), codes, [producer.name], y.name, unscale))

    def finish_rescaling(self) -> None:
        """After every rescaled linear op (or its output Q/DQ), divide by the input factors."""
        for node_name, tables in self._inverse.items():
            node = self._linear_nodes[node_name]
            inverse = np.float32(1.0) / np.prod(np.stack(tables), axis=0).astype(np.float32)
            if self.runtime_scales and node_name in self._output_dq:
                dq, scale, zero_point = self._output_dq[node_name]
                dq.inputs[1] = self.groups.per_sample(f"{node_name}.output_scale", (scale * inverse).astype(np.float32))
                dq.inputs[2] = self._per_sample_zero_point(zero_point, dq.inputs[2].values.dtype, inverse.size)
                dq.attrs["axis"] = 0
                continue
            after = self._output_markers.get(node_name, node.outputs[0])
            rank = self.ranks.get(node.outputs[0].name)
            if rank is None:
                raise ExportError(f"cannot infer the rank of the output of {node_name}")
            factor = self.groups.factor(inverse, rank, f"{node_name}.timestep_unscale")
            restored = gs.Variable(f"{after.name}.unscaled")
            redirect(self.graph, after, restored)
            self.graph.layer(op="Mul", name=f"{node_name}/Unscale", inputs=[after, factor], outputs=[restored])

    def run(self) -> list[QuantizedTensor]:
        marks = [n for n in self.graph.nodes if n.op == MARK_OP and n.domain == MARK_DOMAIN]
        order = {"weight": 0, "activation": 1, "output": 2}
        marks.sort(key=lambda n: order[n.attrs["kind"]])
        for node in marks:
            name, kind = node.attrs["name"], node.attrs["kind"]
            quantizer = self.quantizers.get(name)
            if quantizer is None:
                raise ExportError(f"marker {name} has no quantizer")
            getattr(self, kind)(node, name, quantizer)
        self.finish_rescaling()
        self._resolve_sources()
        self.graph.cleanup().toposort()
        return self.records

    def _resolve_sources(self) -> None:
        """Point each activation record at the tensor its quantizer chain reads now (after unscaling
        Muls were inserted upstream, that is the unscaled value the simulation sees)."""
        nodes = {n.name: n for n in self.graph.nodes}
        for record in self.records:
            if record.kind != "activation":
                continue
            for suffix in ("/Rescale", "/Clip", "/Q"):
                first = nodes.get(record.name + suffix)
                if first is not None:
                    record.source = first.inputs[0].name
                    break


def insert_qdq(model: onnx.ModelProto, quantizers: dict[str, nn.Module], profile: TargetProfile,
               lookup: np.ndarray, opset: int = 21) -> tuple[onnx.ModelProto, list[QuantizedTensor]]:
    """The marked float graph -> the target's Q/DQ graph, plus one record per quantized tensor."""
    ranks = tensor_ranks(model)
    graph = gs.import_onnx(model)
    records = QDQBuilder(graph, quantizers, profile, lookup, ranks).run()
    return to_model(graph, [onnx.helper.make_opsetid("", opset)]), records
