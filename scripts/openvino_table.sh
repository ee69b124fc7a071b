#!/usr/bin/env bash
# The README's CPU engine table (issue 18): digits W8A8 / W4A8 for the onnxruntime and openvino
# targets (ptq-timestep: the method does not change what the engine runs) -> export -> build-engine
# with that backend (verified on this host) -> eval --engine (100 samples, 20 DDIM steps:
# psnr_vs_simulation) -> bench --engine (every float engine timed in the same run); then
# bench-unet on both backends. Prints the host first: the figures hold for this CPU class only.
# Steps whose output exists are skipped.
set -euo pipefail
QE=${QE:-.venv/bin/quest-export}
OUT=${OUT:-out/cpu-engines}
ITER=${ITER:-20}
mkdir -p "$OUT"
{ lscpu | sed -n 's/^Model name: *//p'
  lscpu | sed -n 's/^Flags: *//p' | tr ' ' '\n' | grep -xE "avx2|avx512f|avx512_vnni|avx_vnni|avx512_bf16|amx_int8|amx_bf16|amx_tile|asimddp" | tr '\n' ' '
  echo; } > "$OUT/host.txt"
cat "$OUT/host.txt"
[ -f "$OUT/calib/calibration.json" ] || $QE calibrate --model digits --out "$OUT/calib" --force
# engine NAME TARGET BITS [finetune flags...]: checkpoint -> export -> verified engine -> eval -> bench
# (CKPT=NAME reuses that row's checkpoint; SCALES=per-engine exports one graph per timestep group)
engine() {
  local n=$1 target=$2 bits=$3; shift 3
  local ck=${CKPT:-$n}
  [ -f "$OUT/ckpt-$ck/quant.json" ] || $QE finetune --model digits --bits "$bits" --method ptq-timestep --target "$target" \
    --calibration "$OUT/calib" --out "$OUT/ckpt-$ck" --force "$@"
  [ -f "$OUT/onnx-$n/manifest.json" ] || $QE export "$OUT/ckpt-$ck" --target "$target" --calibration "$OUT/calib" \
    --timestep-scales "${SCALES:-table}" --out "$OUT/onnx-$n" --force
  [ -f "$OUT/engine-$n/manifest.json" ] || $QE build-engine "$OUT/onnx-$n" --backend "$target" --profile digits \
    --calibration "$OUT/calib" --out "$OUT/engine-$n" --force
  [ -f "$OUT/eval-$n.json" ] || $QE eval --engine "$OUT/engine-$n" --num-samples 100 --steps 20 --seed 0 --json "$OUT/eval-$n.json"
  [ -f "$OUT/bench-$n.json" ] || $QE bench --engine "$OUT/engine-$n" --iterations "$ITER" --json "$OUT/bench-$n.json"
}
for bits in w8a8 w4a8; do
  for target in onnxruntime openvino; do
    engine "$target-$bits" "$target" "$bits"
  done
done
# item 4: what the per-timestep scale lookups cost each backend (one timestep group: constant scales, no Gathers)
for target in onnxruntime openvino; do
  engine "$target-w8a8-g1" "$target" w8a8 --timestep-groups 1
done
# item 4 applied: the same checkpoints (2 groups) built into one engine per timestep group (constant scales)
for bits in w8a8 w4a8; do
  for target in onnxruntime openvino; do
    CKPT="$target-$bits" SCALES=per-engine engine "$target-$bits-pe" "$target" "$bits"
  done
done
for bits in w8a8 w4a8; do
  for backend in onnxruntime openvino; do
    [ -f "$OUT/bench-unet-$backend-$bits.json" ] || $QE bench --model bench-unet --backend "$backend" --bits "$bits" \
      --iterations 15 --json "$OUT/bench-unet-$backend-$bits.json"
  done
done
"${PY:-.venv/bin/python}" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| model | engine | ms per call | vs best FP32 | ORT FP32 ms | OpenVINO FP32 ms | OpenVINO BF16 ms | integer conv/linear | engine size vs FP32 ONNX | psnr_vs_simulation (engine verification) |")
print("|---|---|---|---|---|---|---|---|---|---|")
def row(model, name, b, psnr):
    base = b["baselines"]
    bf16 = f"{base['openvino-bf16']['latency_ms']:.1f}" if "openvino-bf16" in base else "-"
    kernels = b.get("integer_kernels", {})
    count = kernels.get("kernel_precisions") or kernels.get("integer_kernels", "")
    if "kernel_precisions" not in kernels and "integer_kernels" in kernels:
        count = f"{kernels['integer_kernels']}/{kernels.get('quantized_linear_ops', '?')}"
    print(f"| {model} | {name} | {b['latency_ms']:.1f} | {b['speedup_vs_best_fp32']:.2f}x ({b['best_fp32']}) | "
          f"{base['onnxruntime-fp32']['latency_ms']:.1f} | {base['openvino-fp32']['latency_ms']:.1f} | {bf16} | {count} | "
          f"{b['size_ratio']:.3f} | {psnr} |")
names = [(f"{t}-{b}", f"digits {b.upper()}", t) for b in ("w8a8", "w4a8") for t in ("onnxruntime", "openvino")]
names += [(f"{t}-w8a8-g1", "digits W8A8, 1 timestep group", t) for t in ("onnxruntime", "openvino")]
names += [(f"{t}-{b}-pe", f"digits {b.upper()}, per-group engines", t) for b in ("w8a8", "w4a8") for t in ("onnxruntime", "openvino")]
for n, model, target in names:
    b = json.loads((out / f"bench-{n}.json").read_text())
    e = json.loads((out / f"eval-{n}.json").read_text())
    v = json.loads((out / f"engine-{n}" / "manifest.json").read_text())["verification"]["result"]
    row(model, f"{target} INT8", b, f"{e['psnr_vs_simulation']:.1f} dB ({v['trajectory_psnr_db']:.1f} dB)")
for bits in ("w8a8", "w4a8"):
    for backend in ("onnxruntime", "openvino"):
        b = json.loads((out / f"bench-unet-{backend}-{bits}.json").read_text())
        row(f"bench-unet {bits.upper()}", f"{backend} INT8", b, "parity only")
PY
