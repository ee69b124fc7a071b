"""``manifest.json`` of an exported graph: what it is, made from what, checked how."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from quest_export.artifacts import sha256_file
from quest_export.export.qdq import QuantizedTensor

FORMAT = "quest-export-onnx/1"


def lookup_sha256(lookup: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(lookup.astype(np.int64)).tobytes()).hexdigest()


def layer_precision(records: list[QuantizedTensor], layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per layer: bits, granularity and storage type of its weight and activation quantizers."""
    table: dict[str, dict[str, Any]] = {}
    for record in records:
        owner = record.name.rsplit(".", 1)[0]
        owner = owner.removesuffix(".processor")
        entry = table.setdefault(owner, {"kind": layers.get(owner, {}).get("kind")})
        key = record.name.rsplit(".", 1)[1].removesuffix("_quantizer")
        entry[key] = {"bits": record.bits, "granularity": record.granularity, "storage": record.storage,
                      "timestep_groups": record.timestep_groups}
    return table


def quantized_layer_count(layers: dict[str, dict[str, Any]]) -> int:
    """Conv/Linear layers with a quantized input in a :func:`layer_precision` table: the ops an
    integer kernel can take (attention matmuls, quantized on some targets, are counted apart)."""
    return sum(1 for info in layers.values() if "input" in info)


def build_manifest(*, checkpoint_dir: Path, checkpoint_meta: dict[str, Any], target: str, opset: int,
                   graph_files: dict[str, Path], records: list[QuantizedTensor], lookup: np.ndarray,
                   timestep_scales: str, graph_precision: str, inputs: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    from quest_export import __version__

    return {
        "format": FORMAT,
        "target": target,
        "opset": opset,
        "graph_precision": graph_precision,
        "timestep_scales": timestep_scales,
        "source_checkpoint": {
            "path": str(checkpoint_dir),
            "tensors_sha256": checkpoint_meta["tensors_sha256"],
            "quant_json_sha256": sha256_file(Path(checkpoint_dir) / "quant.json"),
            "model": checkpoint_meta["model"],
            "bits": checkpoint_meta.get("bits"),
            "method": checkpoint_meta.get("method"),
        },
        "timestep_grid": {
            "num_train_timesteps": int(lookup.size),
            "num_groups": int(lookup.max()) + 1,
            "group_starts": [int(t) for t in range(lookup.size) if t == 0 or lookup[t] != lookup[t - 1]],
            "lookup_sha256": lookup_sha256(lookup),
        },
        "inputs": inputs,
        "graphs": {key: graph_entry(path) for key, path in graph_files.items()},
        "layers": layer_precision(records, checkpoint_meta.get("layers", {})),
        "quantized_tensors": len(records),
        "versions": {"quest_export": __version__},
        **extra,
    }


def graph_entry(path: Path) -> dict[str, Any]:
    """A saved graph's manifest entry: its file, and the external-data file of a graph past 2 GB."""
    from quest_export.onnx_io import data_file

    entry: dict[str, Any] = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    data = data_file(path)
    if data.is_file():
        entry["data"] = {"file": data.name, "sha256": sha256_file(data), "bytes": data.stat().st_size}
    return entry
