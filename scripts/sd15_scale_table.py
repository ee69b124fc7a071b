"""The scale table of scripts/sd15_scale.sh: per stage wall time and peak RSS (from /usr/bin/time),
graph and engine sizes, parity, engine latency vs the FP32 ONNX Runtime engine. Usage:
python scripts/sd15_scale_table.py WORKDIR (prints markdown)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ["build", "calibrate", "finetune-onnxruntime", "export-onnxruntime", "build-engine", "generate", "bench",
          "finetune-tensorrt", "export-tensorrt"]
GB = 1e9


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def stage_rows(work: Path) -> list[str]:
    rows = ["| stage | wall (s) | peak RSS (GB) |", "|---|---:|---:|"]
    for name in STAGES:
        timing = work / f"{name}.time"
        if not timing.is_file():
            continue
        seconds, kib = timing.read_text().split()[-2:]
        rows.append(f"| {name} | {float(seconds):.0f} | {int(kib) * 1024 / GB:.1f} |")
    return rows


def size_rows(work: Path) -> list[str]:
    rows = ["| artifact | size (GB) | note |", "|---|---:|---|"]
    for target in ("onnxruntime", "tensorrt"):
        manifest = _json(work / f"onnx-{target}" / "manifest.json")
        if manifest is None:
            continue
        graph = manifest["graphs"]["model"]
        external = f", weights in {graph['data']['file']}" if "data" in graph else ", one file"
        rows.append(f"| FP32 ONNX graph (traced for {target}) | {manifest['fp32_onnx_bytes'] / GB:.2f} | in memory, protobuf limit 2.15 |")
        rows.append(f"| {target} Q/DQ graph | {manifest['quantized_onnx_bytes'] / GB:.2f} | parity "
                    f"{'passed' if manifest['parity_passed'] else 'FAILED'}{external} |")
    bench = _json(work / "bench.json")
    if bench is not None:
        rows.append(f"| FP32 ONNX Runtime engine | {bench['fp32_engine_bytes'] / GB:.2f} | built by bench from the same UNet |")
        rows.append(f"| W4A8 ONNX Runtime engine | {bench['engine_bytes'] / GB:.2f} | {bench['engine_bytes'] / bench['fp32_engine_bytes']:.2f}x the FP32 engine |")
    return rows


def latency_rows(work: Path) -> list[str]:
    bench = _json(work / "bench.json")
    if bench is None:
        return []
    return ["| engine | ms per UNet call (median) | spread |", "|---|---:|---|",
            f"| FP32 ONNX Runtime | {bench['fp32_latency_ms']:.0f} | {bench['fp32_latency_ms_spread'][0]:.0f}-{bench['fp32_latency_ms_spread'][1]:.0f} |",
            f"| W4A8 ONNX Runtime (ours) | {bench['latency_ms']:.0f} | {bench['latency_ms_spread'][0]:.0f}-{bench['latency_ms_spread'][1]:.0f} |",
            f"| speedup | {bench['speedup']:.2f}x | batch {bench['batch']}, 64x64 latents, {bench['threads']} threads, {bench['iterations']} calls each |"]


def main(work: Path) -> None:
    host = (work / "host.txt").read_text().splitlines() if (work / "host.txt").is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in host if line.startswith("Model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in host if line.startswith("Flags")), [])
    integer = [f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")]
    print(f"Host: {model} ({', '.join(integer) or 'no AVX2'})\n")
    for rows in (stage_rows(work), size_rows(work), latency_rows(work)):
        if len(rows) > 2:
            print("\n".join(rows) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
