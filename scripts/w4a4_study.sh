#!/usr/bin/env bash
# Issue 16: what limits W4A4 on digits, one cause per row, and the 4-bit activation methods.
# Usage: scripts/w4a4_study.sh [causes|methods|seeds|report] (RESULTS=out/w4a4; rows whose eval JSON
# exists are skipped). Same protocol as the README's results: 500 samples, 20 DDIM steps, seed 0.
set -euo pipefail
QE=${QE:-.venv/bin/quest-export}
PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-out/w4a4}
SEED=${SEED:-0}
EVAL=(--num-samples 500 --steps 20 --seed "$SEED")
mkdir -p "$RESULTS"

prepare() {
  [ -f "$RESULTS/calib/calibration.json" ] || $QE calibrate --model digits --out "$RESULTS/calib" --force
  [ -f "$RESULTS/fp-seed$SEED.json" ] || $QE eval --model digits "${EVAL[@]}" --json "$RESULTS/fp-seed$SEED.json"
}

# recipe NAME KEY=VALUE...: recipes/digits-w4a4.yaml with top-level / finetune-stage fields changed
recipe() {
  local name=$1; shift
  "$PY" - "$RESULTS/$name.yaml" "$@" <<'PYEOF'
import sys, yaml
from quest.recipe import recipes_dir
data = yaml.safe_load((recipes_dir() / "digits-w4a4.yaml").read_text())
for item in sys.argv[2:]:
    key, value = item.split("=", 1)
    value = yaml.safe_load(value)
    if key.startswith("stage."):  # stage.FIELD=V (every stage), stage.FIELD*=V (multiply)
        field = key[len("stage."):]
        for stage in data["finetune"]["stages"]:
            stage[field.rstrip("*")] = stage.get(field.rstrip("*"), 0) * value if field.endswith("*") else value
    else:
        data[key] = value
open(sys.argv[1], "w").write(yaml.safe_dump(data, sort_keys=False))
PYEOF
  echo "$RESULTS/$name.yaml"
}

# run NAME [finetune flags...]
run() {
  local name=$1; shift
  [ -f "$RESULTS/$name-seed$SEED.json" ] && return 0
  [ -f "$RESULTS/$name/quant.json" ] || $QE finetune --model digits --bits w4a4 "$@" --calibration "$RESULTS/calib" \
    --device cpu --out "$RESULTS/$name" --force
  $QE eval --checkpoint "$RESULTS/$name" "${EVAL[@]}" --json "$RESULTS/$name-seed$SEED.json"
}

causes() {
  run quest-tensorrt --method quest
  run quest-onnxruntime --method quest --target onnxruntime
  run quest-weight-lr-1e-4 --method quest --recipe "$(recipe weight-lr-1e-4 stage.weight_lr=1e-4)"
  run quest-4x-steps --method quest --recipe "$(recipe 4x-steps 'stage.steps*=4')"
  run quest-groups-20 --method quest --timestep-groups 20
  run quest-groups-5 --method quest --timestep-groups 5
  run blockwise-onnxruntime --method quest --loss blockwise --target onnxruntime
}

case "${1:-causes}" in
  causes) prepare; causes ;;
  *) echo "usage: $0 causes" >&2; exit 2 ;;
esac
