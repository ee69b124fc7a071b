"""One table over several export directories (the README's export matrix).

Usage: ``python -m quest_export.export.summary DIR [DIR ...] [--markdown]``. Reads each directory's
``manifest.json`` and ``parity.json`` and prints the parity, kernel and size figures side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("export", "target", "checkpoint", "graph", "min codes", "max abs err", "bound", "FP32 Q/DQ codes / err",
           "integer kernels", "size vs FP32", "export s")


def _load(directory: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    manifest = json.loads((directory / "manifest.json").read_text())
    parity_path = directory / "parity.json"
    parity = json.loads(parity_path.read_text()) if parity_path.exists() else None
    return manifest, parity


def export_row(directory: Path) -> list[str]:
    """The table row of one export directory."""
    manifest, parity = _load(directory)
    source = manifest["source_checkpoint"]
    row = [directory.name, manifest["target"], f"{source['method']} {source['bits']}", manifest["graph_precision"]]
    if parity is None:
        row += ["not verified", "", "", ""]
    else:
        row += [f"{parity['min_code_agreement']:.5f}", f"{parity['max_abs_error']:.1e}",
                f">= {parity['code_threshold']} / <= {parity['error_bound']:.0e}"]
        fp32 = next((g.get("fp32_qdq_graph") for g in parity.get("graphs", {}).values() if g.get("fp32_qdq_graph")), None)
        row.append(f"{fp32['min_code_agreement']:.5f} / {fp32['max_abs_error']:.1e}" if fp32 else "(is FP32)")
        if not parity["passed"]:
            row[4] += " FAILED"
    kernels = manifest.get("ort_integer_kernels")
    row.append(f"{kernels['integer_kernels']}/{kernels['quantized_linear_ops']}" if kernels else "n/a")
    row.append(f"{manifest['quantized_onnx_bytes'] / max(manifest['fp32_onnx_bytes'], 1):.2f}x")
    row.append(f"{manifest['export_seconds']:.0f}")
    return row


def markdown_table(directories: list[Path]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(export_row(d)) + " |" for d in directories]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    missing = [str(a) for a in args if not (a / "manifest.json").is_file()]
    if not args or missing:
        print(f"usage: python -m quest_export.export.summary EXPORT_DIR...; not export directories: {missing}",
              file=sys.stderr)
        return 2
    print(markdown_table(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
