"""TensorRT backend: strongly typed network from the Q/DQ ONNX, optimisation profiles, timing cache,
serialized plan; and its runtime (preallocated bindings, ``execute_async_v3``, optional CUDA graph).

TensorRT is imported lazily. Without it (or without an NVIDIA GPU) every entry point fails with
one line that says what is missing and points to ``--backend onnxruntime``. Written against the
TensorRT 10 Python API; it cannot run on machines without TensorRT (the CI machines), where the
parts around it (profiles, manifest, lint of its ONNX input) are tested instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quest_export.engine.profiles import BuildProfile
from quest_export.errors import UserError

PLAN_FILE = "engine.plan"


def require() -> None:
    require_tensorrt()


def require_tensorrt():
    """The ``tensorrt`` module and a CUDA device, or a clear UserError."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError:
        raise UserError(
            "TensorRT is not installed (pip install tensorrt from NVIDIA's index, on a machine with an NVIDIA GPU); "
            "use --backend onnxruntime on this machine"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise UserError("the tensorrt backend needs an NVIDIA GPU and none is visible; use --backend onnxruntime")
    return trt


def device_description() -> dict[str, Any]:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"kind": "cuda", "name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def build(onnx_path: Path, out_dir: Path, profile: BuildProfile, unet_config: dict[str, Any]) -> tuple[dict[str, Any], None]:
    """Parse, build and serialize; returns manifest fields (a plan exposes no readable graph)."""
    in_channels, hidden = int(unet_config["in_channels"]), int(unet_config["cross_attention_dim"])
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, profile.workspace_mib << 20)
    config.builder_optimization_level = profile.optimization_level
    optimization = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.shapes(in_channels, hidden).items():
        optimization.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization)
    cache_path = Path(profile.timing_cache) if profile.timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT failed to build the engine (see the TensorRT log above)")
    (out_dir / PLAN_FILE).write_bytes(bytes(plan))
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"backend_version": trt.__version__, "model_file": PLAN_FILE, "device": device_description()}, None


def open_runner(directory: Path, manifest: dict[str, Any], threads: int | None = None) -> "TrtRunner":
    return TrtRunner(directory, manifest)


class TrtRunner:
    """Deserialized engine with preallocated torch output buffers, run on one CUDA stream."""

    def __init__(self, directory: Path, manifest: dict[str, Any], use_cuda_graph: bool = False) -> None:
        trt = require_tensorrt()
        import torch

        device = device_description()
        built_on = manifest.get("device", {})
        if built_on.get("compute_capability") != device["compute_capability"]:
            raise UserError(
                f"the engine was built for compute capability {built_on.get('compute_capability')} "
                f"({built_on.get('name')}), this GPU is {device['compute_capability']} ({device['name']}); rebuild it here"
            )
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine((Path(directory) / manifest["model_file"]).read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.use_cuda_graph = use_cuda_graph
        self._graph = None
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, sample, timestep, encoder_hidden_states):
        import torch

        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        for name, tensor in inputs.items():
            tensor = tensor.contiguous().cuda()
            inputs[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        out_shape = tuple(self.context.get_tensor_shape("out_sample"))
        out = self._buffers.get("out_sample")
        if out is None or tuple(out.shape) != out_shape:
            out = torch.empty(out_shape, dtype=torch.float32, device="cuda")
            self._buffers["out_sample"] = out
        self.context.set_tensor_address("out_sample", out.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return out

    def run(self, sample, timestep, encoder_hidden_states):
        """EngineUNet's call: float32 torch tensors in, the CUDA output tensor out."""
        return self(sample.float(), timestep, encoder_hidden_states.float())
