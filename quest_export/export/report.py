"""Console summary of an export: sizes, timing and the parity table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_export_summary(manifest: dict[str, Any], parity: dict[str, Any] | None, worst: int = 6) -> None:
    console = Console()
    mib = 1 << 20
    console.print(
        f"exported {manifest['target']} graph ({manifest['graph_precision']}, opset {manifest['opset']}, "
        f"{manifest['quantized_tensors']} quantized tensors, {manifest['timestep_grid']['num_groups']} timestep groups) "
        f"in {manifest['export_seconds']:.1f} s; ONNX {manifest['quantized_onnx_bytes'] / mib:.2f} MiB vs FP32 "
        f"{manifest['fp32_onnx_bytes'] / mib:.2f} MiB ({manifest['quantized_onnx_bytes'] / max(manifest['fp32_onnx_bytes'], 1):.2f}x)"
    )
    kernels = manifest.get("ort_integer_kernels")
    if kernels:
        console.print(
            f"ONNX Runtime integer kernels: {kernels['integer_kernels']} of {kernels['quantized_linear_ops']} quantized "
            f"Conv/MatMul ({kernels['integer_share']:.0%}): {kernels['by_op']}"
        )
    if parity is None:
        console.print("parity: not verified (--no-verify)")
        return
    console.print(
        f"parity {'PASSED' if parity['passed'] else 'FAILED'}: min code agreement {parity['min_code_agreement']:.5f} "
        f"(>= {parity['code_threshold']}), max abs error {parity['max_abs_error']:.2e} (<= {parity['error_bound']:.0e})"
    )
    table = Table(title=f"lowest code agreement ({worst} of {len(parity['tensors'])} tensors)")
    for column in ("tensor", "kind", "bits", "agreement", "max code diff"):
        table.add_column(column)
    for row in sorted(parity["tensors"], key=lambda t: t["code_agreement"])[:worst]:
        table.add_row(row["name"], row["kind"], str(row["bits"]), f"{row['code_agreement']:.5f}", str(row["max_code_diff"]))
    console.print(table)
