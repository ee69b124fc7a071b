"""Small graph passes, each with one job (and its own test).

* :func:`redirect` - make every reader of one tensor read another (the one graph edit all passes share).
* :func:`strip_markers` - the plain float graph (markers bypassed): the FP32 baseline engine and
  the size reference.
* :func:`fold_constants` - fold constant subgraphs (shape arithmetic) while keeping every
  Q/DQ node, so weights stay integer initializers.
* :func:`to_fp16` - the TensorRT target's FP16 graph (onnxconverter-common), graph inputs and
  outputs kept FP32, the timestep -> group index subgraph kept FP32 so fractional timesteps
  still map to the right group.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from quest_export.export.markers import MARK_DOMAIN, MARK_OP

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
IR_VERSION = 10  # opset 21 needs IR >= 10; ONNX Runtime 1.31 reads up to 13


def redirect(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Every reader of ``old`` (and the graph outputs) reads ``new`` instead."""
    for consumer in list(old.outputs):
        for index, tensor in enumerate(list(consumer.inputs)):
            if tensor is old:
                consumer.inputs[index] = new
    graph.outputs = [new if t is old else t for t in graph.outputs]


def to_model(graph: gs.Graph, opset_import, ir_version: int = IR_VERSION) -> onnx.ModelProto:
    """Export a graphsurgeon graph with the given opset imports at this project's IR version
    (graphsurgeon would write its own defaults: IR 14, which ONNX Runtime cannot read)."""
    model = gs.export_onnx(graph, do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend(opset_import)
    model.ir_version = ir_version
    return model


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor ONNX's type inference can tell (initializers included)."""
    from quest_export.onnx_io import infer_shapes

    inferred = infer_shapes(model, strict_mode=False)
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    types = {vi.name: vi.type.tensor_type.elem_type for vi in infos if vi.type.tensor_type.elem_type}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def strip_markers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Bypass every ``quest::Mark`` node: the float model the checkpoint was made from."""
    graph = gs.import_onnx(model)
    for node in [n for n in graph.nodes if n.op == MARK_OP and n.domain == MARK_DOMAIN]:
        source, out = node.inputs[0], node.outputs[0]
        redirect(graph, out, source)
        node.inputs.clear()
        node.outputs.clear()
    graph.cleanup().toposort()
    return to_model(graph, [op for op in model.opset_import if op.domain != MARK_DOMAIN])


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding that never evaluates a Q/DQ node (weights stay integer)."""
    graph = gs.import_onnx(model)
    graph.ir_version = IR_VERSION  # what ONNX Runtime (which evaluates the folded nodes) reads
    graph.fold_constants(should_exclude_node=lambda node: node.op in QDQ_OPS, error_ok=True)
    graph.cleanup().toposort()
    return to_model(graph, model.opset_import)


def _keeps_fp32(node: onnx.NodeProto) -> bool:
    """Nodes of the timestep embedding stay FP32 in the FP16 graph.

    The sinusoidal embedding (t * freq up to ~1000 rad) loses its phase in FP16, and its values in
    [-1, 1] rounded to FP16 move ~6% of the 8-bit codes of ``time_embedding.linear_1``'s input to the
    neighbouring code. The MLP is two tiny matmuls on a (batch, C) vector: FP32 there costs nothing.
    """
    names = [node.name, *node.output]
    return any("/time_proj/" in n or "time_embedding" in n for n in names)


def _fp32_island(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes kept FP32: the timestep embedding and the traced Casts that only feed it."""
    island = {n.name for n in model.graph.node if _keeps_fp32(n)}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    island |= {n.name for n in model.graph.node if n.op_type == "Cast" and readers.get(n.output[0])
               and all(r in island for r in readers[n.output[0]])}
    return [n for n in model.graph.node if n.name in island]


def _cast(name: str, source: str, target: str, to: int) -> onnx.NodeProto:
    return onnx.helper.make_node("Cast", [source], [target], name=name, to=to)


def _rejoin_island(converted: onnx.ModelProto, island: list[onnx.NodeProto],
                   island_inits: list[onnx.TensorProto], floats: set[str]) -> onnx.ModelProto:
    """Put the FP32 nodes back with one Cast per crossing float tensor, then sort the graph."""
    graph = converted.graph
    island_names = {n.name for n in island}
    produced_inside = {o for n in island for o in n.output}
    graph_inputs = {i.name for i in graph.input}
    fp32_inits = {i.name for i in island_inits}
    casts: list[onnx.NodeProto] = []
    to_fp32: dict[str, str] = {}
    for node in island:
        for index, name in enumerate(node.input):
            if name in floats and name not in produced_inside and name not in graph_inputs and name not in fp32_inits:
                if name not in to_fp32:
                    to_fp32[name] = f"{name}.fp32"
                    casts.append(_cast(f"{name}/CastFP32", name, to_fp32[name], onnx.TensorProto.FLOAT))
                node.input[index] = to_fp32[name]
    to_fp16: dict[str, str] = {}
    for node in graph.node:
        if node.name in island_names:
            continue
        for index, name in enumerate(node.input):
            if name in produced_inside and name in floats:
                if name not in to_fp16:
                    to_fp16[name] = f"{name}.fp16"
                    casts.append(_cast(f"{name}/CastFP16", name, to_fp16[name], onnx.TensorProto.FLOAT16))
                node.input[index] = to_fp16[name]
    graph.node.extend([*island, *casts])
    graph.initializer.extend(island_inits)
    sorted_graph = gs.import_onnx(converted)
    sorted_graph.toposort()
    return to_model(sorted_graph, converted.opset_import)


def to_fp16(model: onnx.ModelProto, timestep_input: str = "timestep") -> onnx.ModelProto:
    """FP16 graph for TensorRT: every float tensor FP16 except the IO, the timestep lookup and the
    timestep embedding (see :func:`_keeps_fp32`), which are cut out before the conversion and
    joined back with explicit Casts (the converter's own block list casts back and forth around
    every blocked node when the graph carries no type annotations)."""
    import numpy as np
    from onnxconverter_common import float16

    from quest.quantizers import FP16_SCALE_MAX, FP16_SCALE_MIN

    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]  # stale FP32 annotations would contradict the converted nodes
    floats = {name for name, elem in tensor_types(bare).items() if elem == onnx.TensorProto.FLOAT}
    island = [onnx.NodeProto.FromString(n.SerializeToString()) for n in _fp32_island(bare)]
    island_names = {n.name for n in island}
    outside_reads = {name for n in bare.graph.node if n.name not in island_names for name in n.input}
    island_reads = {name for n in island for name in n.input}
    island_inits = [onnx.TensorProto.FromString(i.SerializeToString()) for i in bare.graph.initializer
                    if i.name in island_reads and i.name not in outside_reads]
    kept_nodes = [n for n in bare.graph.node if n.name not in island_names]
    del bare.graph.node[:]
    bare.graph.node.extend(kept_nodes)
    moved = {i.name for i in island_inits}
    kept_inits = [i for i in bare.graph.initializer if i.name not in moved]
    del bare.graph.initializer[:]
    bare.graph.initializer.extend(kept_inits)

    # the range the simulation clamps FP16 scales into (quest.quantizers, graph_scale_table)
    converted = float16.convert_float_to_float16(bare, keep_io_types=True, disable_shape_infer=True,
                                                 min_positive_val=FP16_SCALE_MIN, max_finite_val=FP16_SCALE_MAX,
                                                 op_block_list=float16.DEFAULT_OP_BLOCK_LIST)
    # the group-index subgraph reads the FP32 timestep directly (fp16 rounds 946.6 to 946.5)
    lookup_nodes = [n for n in converted.graph.node if n.output[0] == "quest_t" or n.output[0].startswith("quest_t_")]
    inits = {init.name: init for init in converted.graph.initializer}
    for node in lookup_nodes:
        if node.op_type == "Reshape" and node.output[0] == "quest_t":
            node.input[0] = timestep_input
        for name in node.input:
            init = inits.get(name)
            if init is not None and init.data_type == onnx.TensorProto.FLOAT16:
                value = onnx.numpy_helper.to_array(init).astype(np.float32)
                init.CopyFrom(onnx.numpy_helper.from_array(value, name))
    # casts to float32 traced from torch (``timesteps.float()``) would mix types: make them fp16
    outputs = {o.name for o in converted.graph.output}
    for node in converted.graph.node:
        if node.op_type == "Cast" and node not in lookup_nodes and node.output[0] not in outputs:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16
    return _rejoin_island(converted, island, island_inits, floats)
