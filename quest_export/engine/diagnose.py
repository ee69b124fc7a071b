"""Which layer makes an ONNX Runtime engine compute something else than its reference graph.

Free-running, every tensor after the first wrong one differs too, and correct engines already
differ by propagated tie flips deep in the network, so comparing whole runs names the wrong layer.
Instead each integer kernel of the engine is checked *teacher-forced*, like the export's parity:
the optimized engine graph keeps the names of the tensors its fused kernels produce (a
``QLinearConv`` writes the codes its output ``QuantizeLinear`` wrote in the exported graph, a
``MatMulIntegerToFloat`` the float its ``MatMul`` wrote), so for every such tensor the piece of the
engine graph that computes it from tensors the reference graph also has is cut out, fed the
reference graph's values, and run with the engine's own kernels and session options. A correct
kernel reproduces the reference up to single rounding ties; the layer whose kernel does not is named.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

# kernels whose outputs are checked (integer kernels and the quantizers that feed them)
COMPARED_OPS = {"QLinearConv", "MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm",
                "QuantizeLinear", "DynamicQuantizeLinear", "MatMulNBits", "QLinearAdd", "QLinearMul",
                "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool", "QLinearSoftmax"}
FLOAT_OUTPUT_OPS = {"MatMulIntegerToFloat", "MatMulNBits", "MatMulInteger", "ConvInteger"}  # no rounding inside
TIE_SHARE = 1e-3  # teacher-forced, correct kernels differ from the reference in single ties only (measured <= 2e-5)
FLOAT_TOLERANCE = 1e-4  # relative L2 error of a float kernel output fed identical inputs
CODES_PREFIX = "quest_codes/"


def layer_of(node: onnx.NodeProto) -> str:
    """The torch layer a kernel belongs to, from the quantized tensors it reads or writes
    (its weight codes first: ``quest_codes/<layer>.weight_quantizer``)."""
    names = [n for n in list(node.input) + list(node.output) if n.startswith(CODES_PREFIX)]
    weights = [n for n in names if ".weight_quantizer" in n]
    chosen = (weights or names or [node.output[0]])[0]
    path = chosen.removeprefix(CODES_PREFIX)
    for suffix in (".weight_quantizer", ".input_quantizer", ".output_quantizer"):
        if suffix in path:
            return path.split(suffix)[0]
    return path


def _aliases(reference: onnx.ModelProto, engine: onnx.ModelProto, unknown: set[str]) -> dict[str, str]:
    """Engine tensors renamed by the optimizer after the reference node that computed them (a
    standalone ``QuantizeLinear`` kept by the fusions writes ``<node name>`` instead of its codes
    tensor ``quest_codes/...``): engine name -> the reference tensor with the same values. Only
    where the engine's node reads the same input (a Q moved behind a layout Transpose does not)."""
    engine_inputs = {o: node.input[0] for node in engine.graph.node if node.op_type == "QuantizeLinear" for o in node.output}
    return {node.name: node.output[0] for node in reference.graph.node
            if node.name in unknown and node.op_type == "QuantizeLinear" and len(node.output) == 1
            and engine_inputs.get(node.name) == node.input[0]}


def _exposed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)  # ORT infers the types
    return copy


def _piece(engine: onnx.ModelProto, producers: dict[str, int], target: str, known: set[str],
           constants: dict[str, onnx.TensorProto]) -> tuple[list[int], list[str]]:
    """Engine nodes (in graph order) computing ``target`` from tensors in ``known``; and those inputs."""
    nodes: set[int] = set()
    boundary: list[str] = []
    stack = [target]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name != target and name in known:
            boundary.append(name)
            continue
        if name in constants or name not in producers:
            continue  # initializer, or a graph input the reference also has (in ``known``)
        index = producers[name]
        if index not in nodes:
            nodes.add(index)
            node = engine.graph.node[index]
            stack.extend(node.input)
    return sorted(nodes), boundary


def _run_piece(engine: onnx.ModelProto, nodes: list[int], boundary: list[str], target: str,
               values: dict[str, np.ndarray], constants: dict[str, onnx.TensorProto], session_factory: Any) -> np.ndarray:
    graph_nodes = [engine.graph.node[i] for i in nodes]
    used = {n for node in graph_nodes for n in node.input}
    inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype),
                                                 list(values[name].shape)) for name in boundary]
    graph = onnx.helper.make_graph(graph_nodes, "piece", inputs, [onnx.ValueInfoProto(name=target)],
                                   [constants[n] for n in sorted(used) if n in constants])
    model = onnx.helper.make_model(graph, opset_imports=list(engine.opset_import), ir_version=engine.ir_version)
    session = session_factory(model, False)
    return session.run([target], {name: values[name] for name in boundary})[0]


def _mismatch(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    if np.issubdtype(want.dtype, np.integer):
        diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
        share = float((diff > 0).mean())
        return {"measure": "codes", "mismatch": share, "max_code_diff": int(diff.max()),
                "beyond_ties": bool(diff.max() > 1 or share > TIE_SHARE)}
    norm = float(np.linalg.norm(want.astype(np.float64))) or 1.0
    rel = float(np.linalg.norm((got - want).astype(np.float64)) / norm)
    return {"measure": "float", "mismatch": rel, "beyond_ties": rel > FLOAT_TOLERANCE}


def check_kernels(engine: onnx.ModelProto, reference: onnx.ModelProto, feeds: dict[str, np.ndarray],
                  session_factory: Any) -> list[dict[str, Any]]:
    """Every checked kernel of ``engine``, teacher-forced on the reference's values, worst first.

    ``session_factory(model, optimize)`` opens a session as the engine's runtime does.
    """
    produced = {o for node in reference.graph.node for o in node.output} | set(feeds)
    engine_tensors = {o for node in engine.graph.node for o in node.output}
    aliases = _aliases(reference, engine, engine_tensors - produced)
    known = (produced & engine_tensors) | set(feeds) | set(aliases.values())
    reference_session = session_factory(_exposed(reference, sorted(known - set(feeds))), False)
    names = [o.name for o in reference_session.get_outputs()]
    values = {**feeds, **dict(zip(names, reference_session.run(None, feeds)))}
    values |= {engine_name: values[ref_name] for engine_name, ref_name in aliases.items()}
    producers = {o: i for i, node in enumerate(engine.graph.node) for o in node.output}
    constants = {init.name: init for init in engine.graph.initializer}
    found = []
    for node in engine.graph.node:
        for target in node.output:
            if target not in values or target in feeds:
                continue
            nodes, boundary = _piece(engine, producers, target, set(values), constants)
            kernels = [engine.graph.node[i] for i in nodes if engine.graph.node[i].op_type in COMPARED_OPS]
            if not kernels:
                continue  # float ops only: the reference computes them alike
            if sum(k.op_type != "QuantizeLinear" for k in kernels) > 1:
                continue  # chained integer kernels: a tie flipped in the first propagates, not teacher-forced
            quantizing = any(k.op_type not in FLOAT_OUTPUT_OPS for k in kernels)
            if quantizing and not np.issubdtype(values[target].dtype, np.integer):
                continue  # a float read back from codes: a tie flip there is judged on the codes themselves
            kernel = next((k for k in kernels if k.op_type != "QuantizeLinear"), kernels[0])
            try:
                got = _run_piece(engine, nodes, boundary, target, values, constants, session_factory)
            except Exception:  # noqa: BLE001 - a piece ORT cannot run alone (layout-changed boundary) is no evidence
                continue
            if got.shape != values[target].shape or got.dtype != values[target].dtype:
                continue
            found.append({"layer": layer_of(kernel), "op": kernel.op_type, "tensor": target, **_mismatch(got, values[target])})
    return worst_first(found)


def worst_first(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kernel-check entries, those beyond rounding ties first, then by mismatch."""
    return sorted(found, key=lambda f: (f["beyond_ties"], f["mismatch"]), reverse=True)


def summary(found: list[dict[str, Any]]) -> dict[str, Any]:
    """The kernel check's figures for the manifest."""
    worst = found[0] if found else None
    return {"checked": len(found), "beyond_ties": sum(f["beyond_ties"] for f in found),
            "worst": None if worst is None else {k: worst[k] for k in ("layer", "op", "measure", "mismatch")}}


def describe(found: list[dict[str, Any]]) -> str:
    """One clause naming the worst kernel."""
    if not found:
        return "no kernel of the engine could be compared with the reference graph"
    worst = found[0]
    what = (f"{worst['mismatch']:.1%} of its output codes differ, by up to {worst['max_code_diff']}"
            if worst["measure"] == "codes" else f"output relative error {worst['mismatch']:.3g}")
    bad = sum(f["beyond_ties"] for f in found)
    if worst["beyond_ties"]:
        return (f"worst layer: {worst['layer']} ({worst['op']} fed the reference graph's inputs: {what}; "
                f"{bad} of {len(found)} kernels differ beyond rounding ties)")
    return (f"no kernel differs beyond rounding ties when fed the reference graph's inputs (largest: {worst['layer']}, "
            f"{worst['op']}: {what}); the difference builds up across layers")
