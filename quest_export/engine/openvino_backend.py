"""OpenVINO backend: the exported ``openvino``-target Q/DQ graph compiled by OpenVINO's CPU plugin.

OpenVINO reads the ONNX graph, turns every Q -> DQ pair into a FakeQuantize and, where the ranges
are constants, runs the Convolution / FullyConnected / MatMul between them as oneDNN int8 kernels.
Build saves the model as OpenVINO IR (``model.xml`` + ``model.bin``, int8 weight codes kept as
int8) and compiles it once to verify it and count which layers run in integer; loading compiles it
again (seconds). The IR, not the compiled blob, is what ships: ``export_model``'s blob holds the
weights repacked for this CPU beside float copies (digits W8A8: 5.4 MB compiled vs 1.75 MB of IR
weights; the IR's graph text adds 3-4 MB on digits, negligible at SD size). An engine belongs to the OpenVINO version that built and verified it:
another version refuses it (rebuild), another CPU class re-verifies before its first call, like
every CPU engine (runtime/engine_unet.py).

Inference precision is pinned to f32: on CPUs with native BF16 (AVX512_BF16, AMX) OpenVINO would
otherwise run every float op between the integer kernels in bf16, which the simulation does not.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

from quest_export.engine.cpu_runner import CpuRunner
from quest_export.errors import UserError

MODEL_FILE = "model.xml"  # OpenVINO IR; its weights are model.bin beside it
DEVICE = "CPU"
# the layer types of OpenVINO's runtime model that carry a network's multiply-accumulates; attention
# (q @ k^T, softmax, @ v) is fused into snippet "Subgraph" layers, counted apart
LINEAR_LAYER_TYPES = ("Convolution", "Deconvolution", "FullyConnected", "MatMul")
REPORTED_LAYER_TYPES = (*LINEAR_LAYER_TYPES, "Subgraph")


def require() -> None:
    _openvino()


def _openvino():
    """The ``openvino`` module, or one line naming the fix."""
    try:
        import openvino
    except ImportError:
        raise UserError("OpenVINO is not installed (pip install openvino, or `make setup`); "
                        "use --backend onnxruntime on this machine") from None
    return openvino


def _first_line(error: Exception) -> str:
    """OpenVINO's errors run over many lines (with C++ source paths): the first, for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def compile_config(threads: int = 0, precision: str = "f32") -> dict[str, Any]:
    """Compile properties: one latency stream, ``threads`` intra-op threads (0: OpenVINO's
    default), float ops in ``precision`` (f32 for engines; bench also times bf16/f16 baselines)."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def native_float_precisions() -> list[str]:
    """Reduced float precisions this CPU computes natively in OpenVINO, for bench's baselines:
    bf16 where the plugin reports it (AVX512_BF16, AMX), f16 only with AVX512-FP16 / AMX-FP16
    (elsewhere OpenVINO accepts f16 but computes in f32)."""
    from quest_export.engine.host import cpu_flags

    ov = _openvino()
    capabilities = set(ov.Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
    native = ["bf16"] if "BF16" in capabilities else []
    return native + (["f16"] if {"avx512_fp16", "amx_fp16"} & cpu_flags() else [])


def compile_onnx(onnx_path: Path, threads: int = 0, precision: str = "f32"):
    """Read and compile an ONNX (or IR) file for this CPU; one line when OpenVINO cannot."""
    ov = _openvino()
    core = ov.Core()
    try:
        return core.compile_model(core.read_model(str(onnx_path)), DEVICE, compile_config(threads, precision))
    except RuntimeError as error:
        first = _first_line(error)
        raise UserError(f"OpenVINO could not compile {onnx_path}: {first}") from None


def kernel_precisions(compiled) -> dict[str, int]:
    """How many Convolution / FullyConnected / MatMul (and fused Subgraph) layers of the runtime
    model run in each precision (``"Convolution u8": 49``...): what actually runs in integer after
    compilation."""
    counts: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if layer in REPORTED_LAYER_TYPES:
            precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "unknown"
            counts[f"{layer} {precision}"] += 1
    return dict(sorted(counts.items()))


def integer_kernel_count(precisions: dict[str, int]) -> int:
    """Convolution / FullyConnected / MatMul layers running in i8/u8 (fused subgraphs not counted)."""
    return sum(n for key, n in precisions.items()
               if key.split(" ")[0] in LINEAR_LAYER_TYPES and key.rsplit(" ", 1)[-1] in ("i8", "u8"))


def device_description() -> dict[str, Any]:
    """The host CPU and the features its integer kernels depend on (engine/host.py)."""
    from quest_export.engine.host import host_description

    return host_description()


def build(onnx_path: Path, out_dir: Path, profile: Any, unet_config: dict[str, Any] | None = None):
    """The registry's build (engine/backends.py): :func:`build_model` with the profile's thread count
    (its ``ort.intra_op_threads``: one CPU thread setting for both CPU backends)."""
    return build_model(onnx_path, out_dir, int(profile.ort.get("intra_op_threads", 0)))


def build_model(onnx_path: Path, out_dir: Path, threads: int = 0):
    """Convert ``onnx_path`` to IR in ``out_dir`` and compile it for this CPU; returns the manifest
    fields and None (a compiled model exposes no ONNX graph for the kernel-level check: the engine
    is verified free-running, engine/verify.py)."""
    ov = _openvino()
    core = ov.Core()
    try:
        model = core.read_model(str(onnx_path))
    except RuntimeError as error:
        raise UserError(f"OpenVINO could not read {onnx_path}: {_first_line(error)}") from None
    ov.save_model(model, str(out_dir / MODEL_FILE), compress_to_fp16=False)  # FP32 stays FP32
    compiled = compile_onnx(out_dir / MODEL_FILE, threads)
    precisions = kernel_precisions(compiled)
    fields = {"backend_version": ov.__version__, "model_file": MODEL_FILE, "provider": f"openvino-{DEVICE}",
              "inference_precision": "f32", "kernel_precisions": precisions,
              "integer_kernels": integer_kernel_count(precisions), "device": device_description()}
    return fields, None


def bench_build(onnx_path: Path, out_dir: Path, threads: int) -> dict[str, Any]:
    """An engine of ``onnx_path`` for ``bench`` to time (not shipped: no verification); the manifest
    fields its runner needs."""
    fields, _ = build_model(onnx_path, out_dir, threads)
    return fields


def kernel_report(directory: Path, manifest: dict[str, Any], quantized_linear_ops: int) -> dict[str, Any]:
    """How many quantized Conv/MatMul layers the compiled model runs in i8/u8 (counted from its
    runtime model when the engine was built), with every layer type's runtime precision."""
    return {"quantized_linear_ops": quantized_linear_ops, "integer_kernels": manifest["integer_kernels"],
            "kernel_precisions": manifest["kernel_precisions"]}


def op_profile(model_path: Path, feeds: dict[str, Any], threads: int, calls: int = 8) -> dict[str, dict[str, float]]:
    """Where one call's time goes in the compiled model: OpenVINO's per-layer performance counters
    (``PERF_COUNT``), real time summed per runtime layer type and precision (``"Convolution i8"``:
    the precision read from the kernel's implementation name), ms per call over ``calls`` calls after
    an uncounted warm-up call; most expensive first."""
    ov = _openvino()
    core = ov.Core()
    config = {**compile_config(threads), "PERF_COUNT": True}
    request = core.compile_model(core.read_model(str(model_path)), DEVICE, config).create_infer_request()
    request.infer(feeds)
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for _ in range(calls):
        request.infer(feeds)
        for info in request.get_profiling_info():
            if str(info.status).endswith("NOT_RUN"):  # fused into a neighbour
                continue
            entry = per_op[f"{info.node_type} {_exec_precision(info.exec_type)}"]
            entry[0] += info.real_time.total_seconds() * 1000.0
            entry[1] += 1
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1][0])
    return {op: {"ms": round(total / calls, 2), "nodes": int(count // calls)} for op, (total, count) in ranked}


def _exec_precision(exec_type: str) -> str:
    """The precision at the end of an OpenVINO kernel name (``brgconv_avx512_amx_I8`` -> ``i8``)."""
    tail = exec_type.rsplit("_", 1)[-1].lower() if "_" in exec_type else ""
    return tail if tail in ("i8", "u8", "f32", "bf16", "f16", "i32", "i64") else "other"  # e.g. "undef"


def op_profiles(engine_model: Path, fp32_models: dict[str, Path], feeds: dict[str, Any], threads: int) -> dict[str, Any]:
    """``bench --profile``: OpenVINO's counters on the engine and on OpenVINO FP32 of the FP32 graph."""
    return {"profiler": "OpenVINO", "quantized": op_profile(engine_model, feeds, threads),
            "fp32": op_profile(fp32_models["onnx"], feeds, threads)}


def op_kind(op: str) -> str:
    """What an OpenVINO profile entry is to bench.speed_ceiling: float Convolution/FullyConnected
    (and their Reorders) are the work quantization replaces, their i8/u8 forms the integer kernels,
    attention runs in fused snippet Subgraphs (and Softmax)."""
    layer, precision = op.rsplit(" ", 1)
    if layer.startswith(("Convolution", "FullyConnected")):  # also FullyConnectedQuantizedLegacy
        return "integer" if precision in ("i8", "u8") else "gemm"
    if layer == "Reorder":
        return "gemm"
    return "attention" if layer in ("Subgraph", "Softmax", "ScaledDotProductAttention") else "other"


def model_bytes(directory: Path, manifest: dict[str, Any]) -> int:
    """The engine's IR on disk (graph and weights)."""
    xml = Path(directory) / manifest["model_file"]
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def open_runner(directory: Path, manifest: dict[str, Any], threads: int | None = None) -> "OvRunner":
    return OvRunner(Path(directory), manifest, threads)


class OvRunner(CpuRunner):
    """Runs a compiled OpenVINO engine on numpy inputs."""

    def __init__(self, directory: Path, manifest: dict[str, Any], threads: int | None = None) -> None:
        ov = _openvino()
        built_with = manifest.get("backend_version")
        if built_with != ov.__version__:
            raise UserError(f"engine {directory} was built and verified with OpenVINO {built_with}, this is OpenVINO {ov.__version__}; "
                            "rebuild it with quest-export build-engine --backend openvino (or install that version)")
        self.provider = manifest.get("provider", f"openvino-{DEVICE}")
        count = manifest["profile"].get("ort", {}).get("intra_op_threads", 0) if threads is None else threads
        core = ov.Core()
        try:
            self.compiled = core.compile_model(str(directory / manifest["model_file"]), DEVICE,
                                               compile_config(count, manifest.get("inference_precision", "f32")))
        except RuntimeError as error:
            raise UserError(f"OpenVINO could not load engine {directory} ({_first_line(error)}); "
                            "rebuild it with quest-export build-engine --backend openvino") from None
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.outputs[0]

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, encoder_hidden_states: np.ndarray) -> np.ndarray:
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        return np.array(self.request.infer(feeds)[self.output], copy=True)
