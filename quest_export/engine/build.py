"""``quest-export build-engine``: exported ONNX directory (or a checkpoint, exported first) ->
engine directory with ``manifest.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quest_export.artifacts import atomic_directory, seal_document, write_json_atomic
from quest_export.engine import onnxruntime_backend, tensorrt_backend
from quest_export.engine.manifest import FORMAT, MANIFEST, cpu_description, file_entries
from quest_export.engine.profiles import BuildProfile, load_profile
from quest_export.errors import UserError

BACKENDS = ("tensorrt", "onnxruntime")


def read_export_manifest(directory: Path) -> dict[str, Any]:
    """An exported ONNX directory's manifest, its graph hash checked."""
    from quest_export.artifacts import check_fields, sha256_file, verify_document

    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{directory} is not an exported ONNX directory (no readable manifest.json); run quest-export export") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "quest-export-onnx/1" or "model" not in manifest.get("graphs", {}):
        raise UserError(f"{path} is not a single-graph export (build-engine takes --timestep-scales table exports)")
    check_fields(manifest, {"target": str, "graphs": {"model": {"file": str, "sha256": str}}, "unet_config": dict}, path, "re-export it")
    verify_document(manifest, path, "re-export the checkpoint (quest-export export --force)")
    graph = manifest["graphs"]["model"]
    file = Path(directory) / graph["file"]
    if not file.is_file() or sha256_file(file) != graph["sha256"]:
        raise UserError(f"{file} is missing or does not match its hash in manifest.json; re-export it")
    return manifest


def build_engine(source: Path, backend: str, out: Path, *, profile: str | Path = "digits", force: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the engine for ``backend`` from an export directory or a checkpoint."""
    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    build_profile = load_profile(profile)
    if backend == "tensorrt":
        tensorrt_backend.require_tensorrt()  # before any export work
    if out.exists() and not force:
        raise UserError(f"output directory {out} already exists; pass --force to replace it")
    source = Path(source)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quest-build-") as scratch:
        if (source / "quant.json").is_file():
            from quest_export.export.exporter import export_checkpoint

            log(f"exporting {source} for {backend} first ...")
            export_dir = Path(scratch) / "onnx"
            export_checkpoint(source, backend, export_dir, log=log)
        elif (source / "manifest.json").is_file():
            export_dir = source
        else:
            raise UserError(f"{source} is neither a quantized checkpoint nor an exported ONNX directory")
        export = read_export_manifest(export_dir)
        if export["target"] != backend:
            raise UserError(f"{source} was exported for target {export['target']!r}; build it with --backend {export['target']} "
                            f"or export the checkpoint with --target {backend}")
        size = int(export["unet_config"]["sample_size"])
        if not build_profile.latent.contains(size):
            raise UserError(
                f"build profile {build_profile.name!r} covers latents {build_profile.latent.min}-{build_profile.latent.max}, "
                f"but the model exported in {source} has {size}x{size} latents; pass a profile whose latent range includes {size}"
            )
        return _build_from_export(export_dir, export, backend, build_profile, out, force, started)


def _build_from_export(export_dir: Path, export: dict[str, Any], backend: str, profile: BuildProfile, out: Path,
                       force: bool, started: float) -> dict[str, Any]:
    config = export["unet_config"]
    onnx_path = export_dir / export["graphs"]["model"]["file"]
    with atomic_directory(out, force=force) as tmp:
        if backend == "onnxruntime":
            fields = onnxruntime_backend.build(onnx_path, tmp, profile.ort)
            fields["device"] = cpu_description()
        else:
            fields = tensorrt_backend.build(onnx_path, tmp, profile, int(config["in_channels"]), int(config["cross_attention_dim"]))
        for extra in ("parity.json",):
            if (export_dir / extra).is_file():
                shutil.copy(export_dir / extra, tmp / extra)
        manifest = {
            "format": FORMAT,
            "backend": backend,
            **fields,
            "profile": profile.to_dict(),
            "inputs": export["inputs"],
            "unet_config": config,
            "target": export["target"],
            "opset": export["opset"],
            "graph_precision": export["graph_precision"],
            "timestep_grid": export["timestep_grid"],
            "layers": export["layers"],
            "source_checkpoint": export["source_checkpoint"],
            "source_export": {"graph_sha256": export["graphs"]["model"]["sha256"], "fp32_onnx_bytes": export["fp32_onnx_bytes"],
                              "quantized_onnx_bytes": export["quantized_onnx_bytes"], "parity_passed": export.get("parity_passed")},
            "build_seconds": round(time.perf_counter() - started, 2),
            "files": file_entries(tmp, sorted(p.name for p in tmp.iterdir() if p.is_file())),
        }
        write_json_atomic(tmp / MANIFEST, seal_document(manifest))
    return manifest
