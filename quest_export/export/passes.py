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


def strip_markers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Bypass every ``quest::Mark`` node: the float model the checkpoint was made from."""
    graph = gs.import_onnx(model)
    for node in [n for n in graph.nodes if n.op == MARK_OP and n.domain == MARK_DOMAIN]:
        source, out = node.inputs[0], node.outputs[0]
        redirect(graph, out, source)
        node.inputs.clear()
        node.outputs.clear()
    graph.cleanup().toposort()
    graph.ir_version = IR_VERSION
    out_model = gs.export_onnx(graph)
    kept = [op for op in out_model.opset_import if op.domain != MARK_DOMAIN]
    del out_model.opset_import[:]
    out_model.opset_import.extend(kept)
    return out_model


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding that never evaluates a Q/DQ node (weights stay integer)."""
    graph = gs.import_onnx(model)
    graph.ir_version = IR_VERSION  # what ONNX Runtime (which evaluates the folded nodes) reads
    graph.fold_constants(should_exclude_node=lambda node: node.op in QDQ_OPS, error_ok=True)
    graph.cleanup().toposort()
    folded = gs.export_onnx(graph, do_type_check=False)
    del folded.opset_import[:]
    folded.opset_import.extend(model.opset_import)
    folded.ir_version = IR_VERSION
    return folded


def to_fp16(model: onnx.ModelProto, timestep_input: str = "timestep") -> onnx.ModelProto:
    """FP16 graph for TensorRT: every float tensor FP16 except the IO and the timestep lookup."""
    import numpy as np
    from onnxconverter_common import float16

    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]  # stale FP32 annotations would contradict the converted nodes
    # the sinusoidal timestep embedding (t * freq up to ~1000 rad) loses its phase in FP16: keep it FP32
    keep_fp32 = [n.name for n in bare.graph.node if "/time_proj/" in n.name]
    converted = float16.convert_float_to_float16(bare, keep_io_types=True, disable_shape_infer=True,
                                                 op_block_list=float16.DEFAULT_OP_BLOCK_LIST, node_block_list=keep_fp32)
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
        if (node.op_type == "Cast" and node not in lookup_nodes and node.output[0] not in outputs
                and "/time_proj/" not in node.name):
            for attr in node.attribute:
                if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16
    return converted
