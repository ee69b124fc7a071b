#!/usr/bin/env bash
# The effect of --teacher-dtype on the finetuning loss (issue 15): the same QuEST W4A8 finetune of
# the digits model with its FP teacher in float32, bfloat16 and float16 (the student and the
# quantizer arithmetic stay float32), then each checkpoint's quality against the FP model.
# Usage: scripts/teacher_dtype.sh [WORKDIR]   (default out/teacher-dtype; ~15 min on 2 cores)
set -euo pipefail
W=${1:-out/teacher-dtype}
QE=${QE:-.venv/bin/quest-export}
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-100}
mkdir -p "$W"
[ -f "$W/calib/calibration.json" ] || $QE calibrate --model digits --out "$W/calib" --force
"$PY" - "$W/recipe.yaml" "$STEPS" <<'EOF'
import sys, yaml
from quest.recipe import recipes_dir
data = yaml.safe_load((recipes_dir() / "digits-w4a8.yaml").read_text())
data["finetune"]["stages"] = [{"name": n, "steps": int(sys.argv[2])} for n in ("temporal", "critical")]
open(sys.argv[1], "w").write(yaml.safe_dump(data))
EOF
for dtype in float32 bfloat16 float16; do
  [ -f "$W/$dtype.json" ] && continue
  $QE finetune --model digits --bits w4a8 --method quest --recipe "$W/recipe.yaml" --calibration "$W/calib" \
    --teacher-dtype "$dtype" --device cpu --out "$W/$dtype" --force
  $QE eval --checkpoint "$W/$dtype" --num-samples 200 --steps 20 --seed 0 --json "$W/$dtype.json"
done
"$PY" - "$W" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
print("| teacher | temporal loss (last 10 steps) | critical loss (last 10 steps) | FID (200) | psnr_vs_fp (dB) | finetune s |")
print("|---|---:|---:|---:|---:|---:|")
for dtype in ("float32", "bfloat16", "float16"):
    log = json.loads((work / dtype / "finetune_log.json").read_text())
    meta = json.loads((work / dtype / "quant.json").read_text())
    metrics = json.loads((work / f"{dtype}.json").read_text())
    last = {s: [r["loss"] for r in log if r.get("stage") == s and "loss" in r][-10:] for s in ("temporal", "critical")}
    print(f"| {dtype} | {sum(last['temporal']) / 10:.4e} | {sum(last['critical']) / 10:.4e} | {metrics['fid']:.2f} | "
          f"{metrics['psnr_vs_fp']:.2f} | {meta['timings']['finetune_seconds']:.0f} |")
EOF
