"""Which quantized ops ONNX Runtime really runs as integer kernels after its graph optimizations."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path


INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulNBits", "ConvInteger", "MatMulInteger")
FLOAT_KERNELS = ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm")


def optimized_op_counts(model_path: Path) -> Counter:
    """Op histogram of the graph ORT executes: the ONNX Runtime engine build, into a scratch folder."""
    from quest_export.engine.onnxruntime_backend import optimize

    with tempfile.TemporaryDirectory(prefix="quest-ort-") as tmp:
        graph, _ = optimize(Path(model_path), Path(tmp), {})
    return Counter(node.op_type for node in graph.graph.node)


def integer_kernel_report(model_path: Path, quantized_linear_ops: int) -> dict[str, object]:
    """Share of the graph's quantized Conv/MatMul/Gemm ops that run as integer kernels."""
    return kernel_report_of(optimized_op_counts(model_path), quantized_linear_ops)


def engine_op_counts(engine_model: Path) -> Counter:
    """Op histogram of a built ONNX Runtime engine: its stored graph is the one ORT executes
    (optimised offline), so no optimisation is run again; weights are not read."""
    import onnx

    graph = onnx.load(str(engine_model), load_external_data=False).graph
    return Counter(node.op_type for node in graph.node)


def kernel_report_of(counts: Counter, quantized_linear_ops: int) -> dict[str, object]:
    """:func:`integer_kernel_report` from an op histogram."""
    integer = sum(counts.get(op, 0) for op in INTEGER_KERNELS)
    return {
        "quantized_linear_ops": quantized_linear_ops,
        "integer_kernels": integer,
        "integer_share": integer / quantized_linear_ops if quantized_linear_ops else 0.0,
        "by_op": {op: counts[op] for op in INTEGER_KERNELS + FLOAT_KERNELS if counts.get(op)},
    }
