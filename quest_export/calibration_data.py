"""Record, save and load calibration sets for a loaded model (drives ``quest.calibration``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quest.calibration import CalibrationSet, record_calibration
from quest.recipe import CalibrationSettings
from quest_export.errors import UserError
from quest_export.models.resolve import LoadedModel
from quest_export.sampling import balanced_labels, default_guidance, sample_digits, sample_prompts

CALIB_TENSORS = "calibration.safetensors"
CALIB_META = "calibration.json"


def record_for_model(model: LoadedModel, settings: CalibrationSettings) -> CalibrationSet:
    """Sample ``settings.trajectories`` FP trajectories with the deployment scheduler and record
    the UNet inputs at every step (the step grid is evenly spaced by the scheduler)."""
    guidance = default_guidance(settings.guidance, model)
    meta: dict[str, Any] = {
        "model": model.spec.name,
        "model_hash": model.content_hash,
        "trajectories": settings.trajectories,
        "steps": settings.steps,
        "guidance": guidance,
        "seed": settings.seed,
        "scheduler": type(model.pipeline.scheduler).__name__,
        "step_selection": settings.step_selection,
    }
    if model.traits.class_conditional:
        labels = balanced_labels(settings.trajectories)

        def run() -> None:
            sample_digits(model, labels, settings.steps, guidance, settings.seed)

    else:
        prompts = [settings.prompts[i % len(settings.prompts)] for i in range(settings.trajectories)]
        meta["prompts"] = settings.prompts

        def run() -> None:
            sample_prompts(model, prompts, settings.steps, guidance, settings.seed)

    calib = record_calibration(model.pipeline.unet, run, None, meta)
    return select_steps(model, calib, guidance) if settings.step_selection == "selected" else calib


def calibration_for_checks(model: LoadedModel, qunet: Any, calibration: Path | None, trajectories: int = 2) -> CalibrationSet:
    """Inputs for export parity and engine verification: the set at ``calibration``, or
    ``trajectories`` fresh FP trajectories with the recipe's sampler settings (quantizers of the
    loaded ``qunet`` switched off while recording, so they are the FP model's own)."""
    from quest.quantize import set_quantizers_enabled

    if calibration is not None:
        return load_calibration(calibration, model)
    settings = qunet.recipe.calibration
    small = CalibrationSettings(trajectories=trajectories, steps=settings.steps, guidance=settings.guidance,
                                seed=settings.seed, prompts=settings.prompts)
    set_quantizers_enabled(qunet, False)
    try:
        return record_for_model(model, small)
    finally:
        set_quantizers_enabled(qunet, True)


def select_steps(model: LoadedModel, calib: CalibrationSet, guidance: float) -> CalibrationSet:
    """``--calibration-steps selected``: rebuild the set from the structural-risk-selected timestep
    (``quest.calibration_steps``) with the model's own noise schedule."""
    from quest.calibration_steps import select_calibration_steps

    scheduler = model.pipeline.scheduler
    config = scheduler.config
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
    return select_calibration_steps(
        calib, model.pipeline.unet, scheduler.alphas_cumprod, guidance, int(calib.meta.get("seed", 0)), config.get("prediction_type", "epsilon"), clip
    )


# calibration.json, as checked on load (older sets without the hashes are still accepted)
CALIB_FIELDS: dict[str, Any] = {"model": str, "model_hash": (str, type(None)), "rows": int, "timesteps": list}


def save_calibration(directory: Path, calib: CalibrationSet) -> None:
    """Write both calibration files into ``directory`` (the caller makes it atomic); the JSON
    records the tensor file's sha256 and its own content hash."""
    from quest_export.artifacts import seal_document, sha256_file

    calib.save(Path(directory) / CALIB_TENSORS)
    meta = {k: v for k, v in calib.meta.items() if k not in ("tensors_sha256", "document_sha256")}
    meta = {**meta, "rows": len(calib), "timesteps": calib.timesteps, "tensors_sha256": sha256_file(Path(directory) / CALIB_TENSORS)}
    (Path(directory) / CALIB_META).write_text(json.dumps(seal_document(meta), indent=2) + "\n")


def load_calibration(directory: Path, model: LoadedModel) -> CalibrationSet:
    """Load a calibration set (structure, hashes and finite values checked) and check that it was
    recorded from ``model``."""
    from quest_export.artifacts import read_json_document, sha256_file

    directory = Path(directory)
    tensors, meta_path = directory / CALIB_TENSORS, directory / CALIB_META
    if not tensors.is_file() or not meta_path.is_file():
        raise UserError(f"{directory} holds no calibration set ({CALIB_TENSORS} + {CALIB_META}); record one with `quest-export calibrate`")
    meta = read_json_document(meta_path, CALIB_FIELDS, "re-record the calibration set with `quest-export calibrate`")
    recorded = meta.get("tensors_sha256")
    if recorded is not None and sha256_file(tensors) != recorded:
        raise UserError(f"{tensors} does not match the hash in {CALIB_META}; the file is damaged or was edited, re-record the calibration set")
    try:
        calib = CalibrationSet.load(tensors, meta)
    except ValueError as exc:
        raise UserError(f"calibration set {tensors}: {exc}; re-record it with quest-export calibrate") from None
    except Exception as exc:  # noqa: BLE001 - damaged safetensors raise library-specific errors
        raise UserError(f"cannot read {tensors} ({type(exc).__name__}); the file is damaged, re-record it") from None
    if meta.get("model_hash") != model.content_hash or (model.content_hash is None and meta.get("model") != model.spec.name):
        raise UserError(f"calibration set {directory} was recorded from model {meta.get('model')!r}, not {model.spec.name!r}; record one for this model")
    if len(calib) != meta["rows"]:
        raise UserError(f"{meta_path} says {meta['rows']} rows but {tensors} holds {len(calib)}; re-record the calibration set")
    return calib


def settings_with(trajectories: int | None = None, steps: int | None = None, guidance: float | None = None,
                  seed: int | None = None, step_selection: str | None = None) -> CalibrationSettings:
    """The recipe defaults with ``calibrate``'s flags on top (None keeps the default)."""
    defaults = CalibrationSettings()
    return CalibrationSettings(trajectories=trajectories or defaults.trajectories, steps=steps or defaults.steps,
                               guidance=guidance, seed=defaults.seed if seed is None else seed,
                               step_selection=step_selection or defaults.step_selection)


def record_to_directory(model: str, settings: CalibrationSettings, out: Path, force: bool = False,
                        device: str = "cpu") -> CalibrationSet:
    """Load ``model`` on ``device``, record its calibration set and write it to ``out`` atomically
    (the files hold CPU tensors: a set recorded on a GPU loads anywhere)."""
    from quest_export.artifacts import atomic_directory
    from quest_export.models.resolve import load_model

    calib = record_for_model(load_model(model, device), settings)
    with atomic_directory(out, force=force) as tmp:
        save_calibration(tmp, calib)
    return calib
