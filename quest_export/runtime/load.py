"""Pipelines around engines: the FP pipeline of the engine's source model with ``unet`` swapped."""

from __future__ import annotations

from pathlib import Path

from quest_export.models.resolve import LoadedModel, load_model, source_of
from quest_export.errors import UserError
from quest_export.runtime.engine_unet import EngineUNet


def load_engine_model(directory: Path, backend: str | None = None) -> LoadedModel:
    """Verify and open the engine, load its source model's pipeline, and put the engine in as ``unet``."""
    engine = EngineUNet.from_engine(Path(directory), backend)
    model_info = engine.manifest["source_checkpoint"]["model"]
    loaded = load_model(source_of(model_info))
    loaded.pipeline.unet = engine
    return loaded


def check_engine_shapes(loaded: LoadedModel, per_call: int, guidance: float, batch_flag: str) -> None:
    """Refuse, before sampling, batch sizes and latent resolutions outside the engine's build profile."""
    unet = loaded.pipeline.unet
    profile = unet.profile
    size = int(unet.config["sample_size"])
    if not profile.latent.contains(size):
        raise UserError(
            f"the model samples {size}x{size} latents, outside the engine's build profile {profile.name!r} "
            f"(latent {profile.latent.min}-{profile.latent.max}); rebuild the engine with a profile that covers {size} "
            "(build-engine --profile FILE)"
        )
    calls = per_call * (2 if guidance > 1.0 else 1)
    if not profile.batch.contains(calls):
        raise UserError(
            f"{batch_flag} {per_call} with guidance {guidance} runs the engine on batches of {calls}, outside its build profile "
            f"{profile.name!r} (batch {profile.batch.min}-{profile.batch.max}); lower {batch_flag} or rebuild the engine with a larger batch range"
        )


def reverify_here(directory: Path) -> dict:
    """Re-run the engine's stored verification on this host (``verify-engine``); its figures, the
    host, and the host it was verified on at build time."""
    from quest_export.engine.host import host_description

    unet = EngineUNet.from_engine(Path(directory), verify="always")
    return {**unet.verification, "engine": str(directory), "host": host_description(),
            "verified_at_build_on": unet.manifest["verification"]["host"]}
