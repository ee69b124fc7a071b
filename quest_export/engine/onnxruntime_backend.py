"""ONNX Runtime backend: an offline-optimised model plus the session that runs it.

Build applies every graph optimisation once (Q/DQ fusion into QLinearConv / MatMulIntegerToFloat,
attention and GELU fusions, constant folding) and saves the result, so loading is fast and the
executed graph is the one that was measured. The execution provider is chosen from what the
installed onnxruntime offers (TensorRT or CUDA EPs with onnxruntime-gpu, else CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from quest_export.engine.cpu_runner import CpuRunner
from quest_export.errors import UserError

MODEL_FILE = "model.ort.onnx"
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_provider(requested: str | None = None) -> str:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        if requested not in available:
            raise UserError(f"execution provider {requested} is not available in this onnxruntime ({', '.join(available)})")
        return requested
    # quantized graphs: the CPU EP is the one with fused integer kernels; GPU EPs only when asked
    return "CPUExecutionProvider"


def session_options(threads: int = 0, arena: bool = True, optimize: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = bool(arena)
    options.log_severity_level = 3
    return options


def optimize(onnx_path: Path, scratch: Path, ort_settings: dict[str, Any]):
    """The graph ONNX Runtime will execute: every optimisation applied once, readable names kept."""
    import onnxruntime as ort

    import onnx

    from quest_export.engine import ort_fusions

    from quest_export.onnx_io import EXTERNAL_DATA_LIMIT, HEADROOM, data_file, graph_bytes, graph_files

    options = session_options(ort_settings.get("intra_op_threads", 0), ort_settings.get("memory_arena", True))
    optimized = scratch / f".{MODEL_FILE}.optimized"
    options.optimized_model_filepath = str(optimized)
    if graph_bytes(Path(onnx_path)) > EXTERNAL_DATA_LIMIT - HEADROOM:  # ORT must write the optimised graph's weights apart
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_file(optimized).name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    with ort_fusions.prepared(Path(onnx_path), scratch) as (source, disabled, fusions):  # fused attention, FP32 and quantized alike
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    model = onnx.load(str(optimized))  # external weights, if any, are read back into the proto
    for path in graph_files(optimized):
        path.unlink()
    return model, fusions


def require() -> None:
    """onnxruntime is a dependency of the package; nothing more is needed on any host."""


def device_description() -> dict[str, Any]:
    """The host CPU and the features its integer kernels depend on (engine/host.py)."""
    from quest_export.engine.host import host_description

    return host_description()


def build(onnx_path: Path, out_dir: Path, profile: Any, unet_config: dict[str, Any] | None = None):
    """The registry's build (engine/backends.py): :func:`build_model` with the build profile's ORT settings."""
    return build_model(onnx_path, out_dir, profile.ort)


def build_model(onnx_path: Path, out_dir: Path, ort_settings: dict[str, Any], keep_readable: bool = True):
    """Optimise ``onnx_path`` offline into ``out_dir/model.ort.onnx``; returns the manifest fields
    and the optimised graph with its readable names (what verification checks kernel by kernel;
    None with ``keep_readable`` False, which saves a copy of the graph in memory)."""
    import onnxruntime as ort

    import onnx

    from quest_export.engine import storage
    from quest_export.onnx_io import save_graph

    model, fusions = optimize(Path(onnx_path), out_dir, ort_settings)
    readable = None
    if keep_readable:
        readable = onnx.ModelProto()
        readable.CopyFrom(model)
    stored = storage.store_engine_model(model)  # packed 4-bit weights, compact names
    save_graph(model, out_dir / MODEL_FILE)
    fields = {"backend_version": ort.__version__, "model_file": MODEL_FILE, "provider": "CPUExecutionProvider",
              "storage": stored, "fusions": fusions, "device": device_description()}
    return fields, readable


def bench_build(onnx_path: Path, out_dir: Path, threads: int) -> dict[str, Any]:
    """An engine of ``onnx_path`` for ``bench`` to time (not shipped: no verification, no readable
    copy); the manifest fields its runner needs."""
    fields, _ = build_model(onnx_path, out_dir, {"intra_op_threads": threads}, keep_readable=False)
    return fields


def kernel_report(directory: Path, manifest: dict[str, Any], quantized_linear_ops: int) -> dict[str, Any]:
    """How many of the engine's quantized Conv/MatMul/Gemm ops run as ORT integer kernels."""
    from quest_export.export.kernels import engine_op_counts, kernel_report_of

    return kernel_report_of(engine_op_counts(Path(directory) / manifest["model_file"]), quantized_linear_ops)


def model_bytes(directory: Path, manifest: dict[str, Any]) -> int:
    """The engine's model on disk (external weights included)."""
    from quest_export.onnx_io import graph_bytes

    return graph_bytes(Path(directory) / manifest["model_file"])


def op_profiles(engine_model: Path, fp32_models: dict[str, Path], feeds: dict[str, Any], threads: int) -> dict[str, Any]:
    """``bench --profile``: ORT's profiler on the engine and on the FP32 ORT engine bench built."""
    from quest_export.engine import storage
    from quest_export.engine.bench import op_profile

    return {"profiler": "ONNX Runtime",
            "quantized": op_profile(storage.engine_session_source(str(engine_model)), feeds, threads),
            "fp32": op_profile(storage.engine_session_source(str(fp32_models["onnxruntime"])), feeds, threads)}


def op_kind(op: str) -> str:
    """What an ORT profile entry is to bench.speed_ceiling."""
    from quest_export.engine.bench import ort_op_kind

    return ort_op_kind(op)


def piece_sessions(manifest: dict[str, Any], runner: "OrtRunner"):
    """Opens sessions on pieces of the engine graph with the engine's own options and execution
    provider (engine/diagnose.py's kernel-level check)."""

    def session(model, optimize: bool):
        from quest_export.onnx_io import inference_session

        options = session_options(manifest["profile"]["ort"].get("intra_op_threads", 0), optimize=optimize)
        options.log_severity_level = 4  # a piece ORT cannot run alone is skipped, not reported
        return inference_session(model, options, [runner.provider])

    return session


def open_runner(directory: Path, manifest: dict[str, Any], threads: int | None = None) -> "OrtRunner":
    return OrtRunner(directory, manifest, threads=threads)


class OrtRunner(CpuRunner):
    """Runs a built ORT engine on numpy inputs (the optimised graph is loaded without re-optimising)."""

    def __init__(self, directory: Path, manifest: dict[str, Any], provider: str | None = None, threads: int | None = None) -> None:
        from quest_export.engine import storage
        from quest_export.onnx_io import inference_session

        settings = manifest["profile"].get("ort", {})
        options = session_options(settings.get("intra_op_threads", 0) if threads is None else threads,
                                  settings.get("memory_arena", True), optimize=False)
        self.provider = choose_provider(provider)
        source = storage.engine_session_source(str(Path(directory) / manifest["model_file"]))
        self.session = inference_session(source, options, [self.provider])
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, encoder_hidden_states: np.ndarray) -> np.ndarray:
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        return self.session.run([self.output_name], feeds)[0]
