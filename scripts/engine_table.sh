#!/usr/bin/env bash
# The README's engine table ("Export and engines"): QuEST checkpoints of the onnxruntime target at
# W8A8, W4A8 and W4A4 -> export -> build-engine (verified on this host) -> eval --engine (100
# samples) -> bench --engine --profile; then bench-unet at W8A8 and W4A8. Prints the host first:
# the figures hold for this CPU class only. Steps whose output exists are skipped.
set -euo pipefail
QE=${QE:-.venv/bin/quest-export}
OUT=${OUT:-out/engines}
mkdir -p "$OUT"
{ lscpu | sed -n 's/^Model name: *//p'
  lscpu | sed -n 's/^Flags: *//p' | tr ' ' '\n' | grep -xE "avx2|avx512f|avx512_vnni|avx_vnni|amx_int8|amx_tile|asimddp" | tr '\n' ' '
  echo; } > "$OUT/host.txt"
cat "$OUT/host.txt"
[ -f "$OUT/calib/calibration.json" ] || $QE calibrate --model digits --out "$OUT/calib" --force
for bits in w8a8 w4a8 w4a4; do
  ckpt="$OUT/quest-$bits"
  [ -f "$ckpt/quant.json" ] || $QE finetune --model digits --bits "$bits" --method quest --target onnxruntime \
    --calibration "$OUT/calib" --out "$ckpt" --force
  [ -f "$OUT/onnx-$bits/manifest.json" ] || $QE export "$ckpt" --target onnxruntime --calibration "$OUT/calib" \
    --out "$OUT/onnx-$bits" --force
  [ -f "$OUT/engine-$bits/manifest.json" ] || $QE build-engine "$OUT/onnx-$bits" --backend onnxruntime --profile digits \
    --calibration "$OUT/calib" --out "$OUT/engine-$bits" --force
  [ -f "$OUT/eval-$bits.json" ] || $QE eval --engine "$OUT/engine-$bits" --num-samples 100 --steps 20 --seed 0 \
    --json "$OUT/eval-$bits.json"
  [ -f "$OUT/bench-$bits.json" ] || $QE bench --engine "$OUT/engine-$bits" --iterations 20 --profile --json "$OUT/bench-$bits.json"
done
for bits in w8a8 w4a8; do
  [ -f "$OUT/bench-unet-$bits.json" ] || $QE bench --model bench-unet --bits "$bits" --iterations 15 --profile \
    --json "$OUT/bench-unet-$bits.json"
done
"${PY:-.venv/bin/python}" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| engine (ONNX Runtime CPU) | speedup vs FP32 engine | latency ms (FP32 ms) | engine size vs FP32 ONNX | psnr_vs_simulation | FID / label acc. (100 samples) | verification per call / trajectory |")
print("|---|---|---|---|---|---|---|")
for bits in ("w8a8", "w4a8", "w4a4"):
    b = json.loads((out / f"bench-{bits}.json").read_text())
    e = json.loads((out / f"eval-{bits}.json").read_text())
    v = json.loads((out / f"engine-{bits}" / "manifest.json").read_text())["verification"]["result"]
    print(f"| digits quest {bits.upper()} | {b['speedup']:.2f}x | {b['latency_ms']:.1f} ({b['fp32_latency_ms']:.1f}) | "
          f"{b['size_ratio']:.3f} | {e['psnr_vs_simulation']:.1f} dB | {e['fid']:.1f} / {e['label_accuracy']:.2f} | "
          f"{v['per_call_rel_error']:.3g} / {v['trajectory_psnr_db']:.1f} dB |")
for bits in ("w8a8", "w4a8"):
    b = json.loads((out / f"bench-unet-{bits}.json").read_text())
    print(f"| bench-unet {bits.upper()} (plain PTQ) | {b['speedup']:.2f}x | {b['latency_ms']:.1f} ({b['fp32_latency_ms']:.1f}) | "
          f"{b['size_ratio']:.3f} | - | - | parity only |")
PY
