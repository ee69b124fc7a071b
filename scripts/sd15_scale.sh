#!/usr/bin/env bash
# Every stage of the sd15 path at SD1.5's real size, with the real commands, on this machine
# (issue 15): the built-in sd15-shaped model (SD1.5's exact UNet config, 860M parameters, seeded
# random weights) -> calibrate -> finetune --method quest (both targets, a few steps per stage)
# -> export (both targets, parity run) -> build-engine --backend onnxruntime -> generate --engine
# -> bench (engine vs the FP32 ONNX Runtime engine, batch 2, 64x64 latents).
#
# Usage: scripts/sd15_scale.sh [WORKDIR]   (default out/sd15-scale; about an hour on 2 cores)
# Every stage's wall time and peak RSS come from /usr/bin/time; the table is written to
# WORKDIR/scale.md (scripts/sd15_scale_table.py). A stage whose output exists is skipped, so an
# interrupted run continues where it stopped; DEVICE=cuda runs the PyTorch stages on a GPU;
# TARGETS=tensorrt runs one target's finetune and export only.
set -euo pipefail
W=${1:-out/sd15-scale}
QE=${QE:-.venv/bin/quest-export}
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cpu}
STEPS=${STEPS:-4}             # sampler steps of calibration, verification and generation
FT_STEPS=${FT_STEPS:-2}       # finetuning steps per stage
TARGETS=${TARGETS:-"onnxruntime tensorrt"}  # export targets to finetune and export for
mkdir -p "$W"

# stage NAME OUTPUT COMMAND...: run COMMAND under /usr/bin/time unless OUTPUT exists
stage() {
  local name=$1 output=$2; shift 2
  if [ -e "$output" ]; then echo "[$name] done before: $output"; return 0; fi
  echo "[$name] $*"
  if ! /usr/bin/time -f "%e %M" -o "$W/$name.time" "$@" > "$W/$name.log" 2>&1; then
    echo "[$name] failed (see $W/$name.log):"; tail -n 5 "$W/$name.log"; exit 1
  fi
  tail -n 2 "$W/$name.log"
}

# the shipped sd15 W4A8 recipe with short stages (everything else as shipped)
sed -e "s/steps: 500, batch_size: 8/steps: $FT_STEPS, batch_size: 1/" -e "s/steps: 1000, batch_size: 8/steps: $FT_STEPS, batch_size: 1/" \
  recipes/sd15-w4a8.yaml > "$W/recipe.yaml"
lscpu | grep -E "^(Model name|Flags)" > "$W/host.txt"

stage build "$HOME/.cache/quest-export/sd15-shaped/model_index.json" \
  "$PY" -c "from quest_export.models.sd_shaped import sd15_shaped_dir; print(sd15_shaped_dir(log=print))"
stage calibrate "$W/calib" $QE calibrate --model sd15-shaped --trajectories 2 --steps "$STEPS" --device "$DEVICE" --out "$W/calib"
for target in $TARGETS; do
  stage "finetune-$target" "$W/quest-$target" $QE finetune --model sd15-shaped --bits w4a8 --method quest --target "$target" \
    --recipe "$W/recipe.yaml" --calibration "$W/calib" --device "$DEVICE" --out "$W/quest-$target"
  stage "export-$target" "$W/onnx-$target" $QE export "$W/quest-$target" --target "$target" --calibration "$W/calib" \
    --out "$W/onnx-$target"
  if [ "$target" = onnxruntime ]; then
    stage build-engine "$W/engine" $QE build-engine "$W/onnx-onnxruntime" --backend onnxruntime --profile sd15-512 \
      --calibration "$W/calib" --verify-samples 1 --out "$W/engine"
    stage generate "$W/engine.png" $QE generate --engine "$W/engine" --prompt "a watercolor painting of a lighthouse" \
      --num-images 1 --steps "$STEPS" --out "$W/engine.png"
    stage bench "$W/bench.json" $QE bench --engine "$W/engine" --baselines onnxruntime-fp32 --warmup 1 --iterations 5 --json "$W/bench.json"
  fi
done
"$PY" scripts/sd15_scale_table.py "$W" | tee "$W/scale.md"
