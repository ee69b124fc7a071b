"""The engine backends, in one registry: what ``build-engine``, ``EngineUNet`` and ``bench`` ask of
a backend goes through :class:`Backend`, so nothing outside a backend's own module branches on its
name.

Each backend module provides ``require()`` (its runtime is installed and usable here, else one
UserError line), ``build(onnx_path, out_dir, profile, unet_config) -> (manifest fields, readable
engine graph or None)``, ``open_runner(directory, manifest, threads)`` (an object with
``run(sample, timestep, encoder_hidden_states) -> tensor`` on torch tensors) and
``device_description()`` (what the engine's kernels depend on, recorded in the manifest and compared
when the engine is loaded). CPU backends add what ``bench`` needs: ``bench_build``,
``kernel_report``, ``model_bytes``, ``op_profiles`` and ``op_kind``. Modules are imported lazily: TensorRT need not be installed to use
ONNX Runtime, and OpenVINO only for its own engines.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from quest_export.errors import UserError


@dataclass(frozen=True)
class Backend:
    """One engine backend."""

    name: str
    target: str  # the target profile (quest.profiles) whose exported graphs it builds
    device: str  # the torch device EngineUNet reports to pipelines
    module: str  # the implementation module
    description: str

    @property
    def impl(self) -> ModuleType:
        return importlib.import_module(self.module)

    def require(self) -> None:
        """Fail early, with the fix, when this backend cannot run on this machine."""
        self.impl.require()

    def build(self, onnx_path: Path, out_dir: Path, profile: Any, unet_config: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        return self.impl.build(Path(onnx_path), Path(out_dir), profile, unet_config)

    def open_runner(self, directory: Path, manifest: dict[str, Any], threads: int | None = None) -> Any:
        """The engine's runner; for a per-group engine (engine/groups.py), one runner over its groups'."""
        from quest_export.engine import groups

        if not groups.is_grouped(manifest):
            return self.impl.open_runner(Path(directory), manifest, threads)
        runners = [self.impl.open_runner(d, m, threads) for d, m in groups.pieces(Path(directory), manifest)]
        return groups.GroupedRunner(runners, groups.group_lookup(manifest["timestep_grid"]))

    def device_description(self) -> dict[str, Any]:
        return self.impl.device_description()

    # what ``bench`` asks of a CPU backend (its device is "cpu")
    def bench_build(self, onnx_path: Path, out_dir: Path, threads: int) -> dict[str, Any]:
        fields = self.impl.bench_build(Path(onnx_path), Path(out_dir), threads)
        return {**fields, "backend": self.name, "profile": {"ort": {"intra_op_threads": threads}}}  # the CPU thread setting

    def kernel_report(self, directory: Path, manifest: dict[str, Any], quantized_linear_ops: int) -> dict[str, Any]:
        """How many quantized ops run as integer kernels; a per-group engine reports its first
        group's engine and each group's count (``per_group_integer_kernels``)."""
        from quest_export.engine import groups

        reports = [self.impl.kernel_report(d, m, quantized_linear_ops) for d, m in groups.pieces(Path(directory), manifest)]
        if len(reports) == 1:
            return reports[0]
        return {**reports[0], "group_engines": len(reports),
                "per_group_integer_kernels": [r["integer_kernels"] for r in reports]}

    def model_bytes(self, directory: Path, manifest: dict[str, Any]) -> int:
        """The engine's files on disk (every group engine's, for a per-group engine)."""
        from quest_export.engine import groups

        return sum(self.impl.model_bytes(d, m) for d, m in groups.pieces(Path(directory), manifest))

    def op_profiles(self, engine_model: Path, fp32_models: dict[str, Path], feeds: dict[str, Any], threads: int) -> dict[str, Any]:
        """Per-op-type time of the engine and of this backend's FP32 engine, by its own profiler."""
        return self.impl.op_profiles(Path(engine_model), fp32_models, feeds, threads)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("tensorrt", target="tensorrt", device="cuda", module="quest_export.engine.tensorrt_backend",
                description="TensorRT plan (NVIDIA GPU)"),
        Backend("onnxruntime", target="onnxruntime", device="cpu", module="quest_export.engine.onnxruntime_backend",
                description="ONNX Runtime offline-optimised model (CPU integer kernels)"),
        Backend("openvino", target="openvino", device="cpu", module="quest_export.engine.openvino_backend",
                description="OpenVINO compiled model (CPU plugin, oneDNN integer kernels)"),
    )
}


def get_backend(name: str, what: str = "--backend") -> Backend:
    """The backend called ``name``, or one line listing the known ones."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown {what} {name!r}; choose one of: {', '.join(BACKENDS)}") from None


def backend_of_manifest(manifest: dict[str, Any]) -> Backend:
    """The backend an engine directory was built with (an engine from a newer version is refused)."""
    backend = BACKENDS.get(manifest["backend"])
    if backend is None:
        raise UserError(f"engine backend {manifest['backend']!r} is unknown to this version; rebuild the engine")
    return backend
