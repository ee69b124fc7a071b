#!/usr/bin/env bash
# The README's results tables on digits. Usage: scripts/digits_results.sh baselines|quest|options|exports|report
# Runs whose eval JSON exists are skipped, so an interrupted run continues where it stopped.
set -euo pipefail
QE=${QE:-.venv/bin/quest-export}
RESULTS=${RESULTS:-out/results}
EVAL=(--num-samples 500 --steps 20 --seed 0)

prepare() {
  [ -f "$RESULTS/calib/calibration.json" ] || $QE calibrate --model digits --out "$RESULTS/calib" --force
  [ -f "$RESULTS/fp.json" ] || $QE eval --model digits "${EVAL[@]}" --json "$RESULTS/fp.json"
}

# run NAME BITS METHOD [extra finetune flags...]   (CALIB=DIR picks another calibration set)
# Every method on the same layer map: --act8-layers 0 (ACT8=N for another), so these tables compare
# methods at plain W4A4; the W4A4 recipes' default act8_layers 8 is measured in scripts/w4a4_study.sh.
run() {
  local name=$1 bits=$2 method=$3; shift 3
  [ -f "$RESULTS/$name.json" ] && return 0
  $QE finetune --model digits --bits "$bits" --method "$method" --act8-layers "${ACT8:-0}" "$@" --calibration "${CALIB:-$RESULTS/calib}" --out "$RESULTS/$name" --force
  $QE eval --checkpoint "$RESULTS/$name" "${EVAL[@]}" --json "$RESULTS/$name.json"
}

baselines() {
  for bits in w8a8 w4a8 w4a4; do for m in ptq ptq-timestep modelopt; do run "$m-$bits" "$bits" "$m"; done; done
}

quest() {
  for bits in w4a8 w4a4 w8a8; do run "quest-$bits" "$bits" quest; done
  run quest-stage1-only-w4a4 w4a4 quest --stages temporal
  run quest-stage2-only-w4a4 w4a4 quest --stages critical
  run quest-single-set-w4a4 w4a4 quest --timestep-groups 1
}

# issue 8: each option alone on top of the QuEST default
options() {
  [ -f "$RESULTS/calib-selected/calibration.json" ] || $QE calibrate --model digits --calibration-steps selected --out "$RESULTS/calib-selected" --force
  for bits in w4a4 w4a8; do
    run "quest-searched-groups-$bits" "$bits" quest --grouping searched
    CALIB="$RESULTS/calib-selected" run "quest-selected-steps-$bits" "$bits" quest --calibration-steps selected
    run "quest-dilation-$bits" "$bits" quest --weight-dilation
    run "blockwise-$bits" "$bits" quest --loss blockwise
  done
}

# issue 5: QuEST checkpoints for each engine target, exported with parity (the export matrix)
exports() {
  local out=${EXPORTS:-out/matrix}
  mkdir -p "$out"
  for bits in w8a8 w4a8 w4a4; do
    local ckpt="$RESULTS/quest-$bits"  # the results table's checkpoints are tensorrt-target
    for target in tensorrt onnxruntime; do
      if [ "$target" = onnxruntime ]; then
        ckpt="$RESULTS/quest-ort-$bits"
        [ -f "$ckpt/quant.json" ] || $QE finetune --model digits --bits "$bits" --method quest --target onnxruntime \
          --calibration "$RESULTS/calib" --out "$ckpt" --force
      fi
      [ -f "$out/quest-$bits-$target/parity.json" ] || $QE export "$ckpt" --target "$target" \
        --calibration "$RESULTS/calib" --out "$out/quest-$bits-$target" --force
    done
  done
  "${PY:-.venv/bin/python}" -m quest_export.export.summary "$out"/quest-*/
}

report() {
  local files=("$RESULTS/fp.json")
  for bits in w8a8 w4a8 w4a4; do for m in ptq ptq-timestep modelopt quest; do files+=("$RESULTS/$m-$bits.json"); done; done
  files+=("$RESULTS"/quest-stage1-only-w4a4.json "$RESULTS"/quest-stage2-only-w4a4.json "$RESULTS"/quest-single-set-w4a4.json)
  for bits in w4a8 w4a4; do
    for o in quest-searched-groups quest-selected-steps quest-dilation blockwise; do files+=("$RESULTS/$o-$bits.json"); done
  done
  $QE report "${files[@]}"
}

mkdir -p "$RESULTS"
case "${1:-all}" in
  baselines) prepare; baselines ;;
  quest) prepare; quest ;;
  options) prepare; options ;;
  exports) prepare; exports ;;
  report) report ;;
  all) prepare; baselines; quest; options; report ;;
  *) echo "usage: $0 baselines|quest|options|exports|report|all" >&2; exit 2 ;;
esac
