"""Pipelines around engines: the FP pipeline of the engine's source model with ``unet`` swapped."""

from __future__ import annotations

from pathlib import Path

from quest_export.models.resolve import LoadedModel, load_model
from quest_export.runtime.engine_unet import EngineUNet


def load_engine_model(directory: Path, backend: str | None = None) -> LoadedModel:
    """Verify and open the engine, load its source model's pipeline, and put the engine in as ``unet``."""
    engine = EngineUNet.from_engine(Path(directory), backend)
    model_info = engine.manifest["source_checkpoint"]["model"]
    loaded = load_model("digits" if model_info["name"] == "digits" else model_info["source"])
    loaded.pipeline.unet = engine
    return loaded
