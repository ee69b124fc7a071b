# The README's two commands: `make demo` and `make test`. Both set up .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build of torch unless an NVIDIA GPU is present (a plain `torch` requirement pulls CUDA wheels).
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= out/demo

.PHONY: setup demo test test-all clean results

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the default (CUDA) torch build"; \
		$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" || $(PY) -m pip install --quiet torch; \
	else \
		echo "no NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"; \
	fi
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

QE := $(VENV)/bin/quest-export

# The main job on the shipped demo model: FP grid + metrics, then QuEST W4A8 (onnxruntime target)
# -> export (parity-checked) -> ONNX Runtime engine -> engine grid, quality and speed ratio.
demo: setup
	$(QE) generate --model digits --num-images 40 --steps 20 --seed 0 --out $(DEMO_OUT)/grid.png
	$(QE) eval --model digits --num-samples 500 --steps 20 --seed 0 --json $(DEMO_OUT)/eval.json
	$(QE) calibrate --model digits --out $(DEMO_OUT)/calib --force
	$(QE) finetune --model digits --bits w4a8 --method quest --target onnxruntime --calibration $(DEMO_OUT)/calib --out $(DEMO_OUT)/quest-w4a8 --force
	$(QE) export $(DEMO_OUT)/quest-w4a8 --target onnxruntime --calibration $(DEMO_OUT)/calib --out $(DEMO_OUT)/onnx-w4a8 --force
	$(QE) build-engine $(DEMO_OUT)/onnx-w4a8 --backend onnxruntime --profile digits --calibration $(DEMO_OUT)/calib --out $(DEMO_OUT)/engine-w4a8 --force
	$(QE) generate --engine $(DEMO_OUT)/engine-w4a8 --num-images 40 --steps 20 --seed 0 --out $(DEMO_OUT)/engine-grid.png
	$(QE) eval --engine $(DEMO_OUT)/engine-w4a8 --num-samples 500 --steps 20 --seed 0 --json $(DEMO_OUT)/engine-eval.json
	$(QE) bench --engine $(DEMO_OUT)/engine-w4a8 --json $(DEMO_OUT)/bench.json

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ""

clean:
	rm -rf out build *.egg-info

# The README's results table on digits: baselines, QuEST and its ablations (scripts/digits_results.sh;
# runs whose eval JSON exists are skipped).
results: setup
	bash scripts/digits_results.sh all
