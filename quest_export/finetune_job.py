"""``quest-export finetune`` as a library call: the recipe with the command's overrides, the model
and calibration set, the quantization method, and the checkpoint written atomically (the CLI only
parses flags and prints)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quest_export import cli_checks
from quest_export.devices import device_name, resolve_device, resolve_teacher_dtype
from quest_export.errors import UserError


def apply_option_flags(recipe, method: str, grouping: str | None, weight_dilation: bool | None, loss: str | None,
                       calibration_steps: str | None, act8_layers: int | None = None):
    """The recipe options given as flags (`--grouping`, `--weight-dilation`, `--loss`,
    `--calibration-steps`, `--act8-layers`) on the recipe, checked against the method."""
    cli_checks.check_choice("--grouping", grouping, "GROUPINGS")
    cli_checks.check_choice("--loss", loss, "FINETUNE_LOSSES")
    cli_checks.check_choice("--calibration-steps", calibration_steps, "STEP_SELECTIONS")
    if loss is not None and method != "quest":
        raise UserError("--loss applies only to --method quest")
    if grouping is not None:
        recipe = replace(recipe, grouping=grouping)
    if recipe.grouping == "searched" and method == "modelopt":
        raise UserError("--grouping searched needs --method quest or ptq-timestep (ModelOpt calibrates one table)")
    if weight_dilation is not None:
        recipe = replace(recipe, weight_dilation=weight_dilation)
    if loss is not None:
        recipe = replace(recipe, finetune=replace(recipe.finetune, loss=loss))
    if calibration_steps is not None:
        recipe = replace(recipe, calibration=replace(recipe.calibration, step_selection=calibration_steps))
    if act8_layers is not None:
        recipe = replace(recipe, act8_layers=act8_layers)
    if recipe.act8_layers and method == "modelopt":
        raise UserError(f"the recipe keeps {recipe.act8_layers} layers at 8-bit activations (act8_layers, the W4A4 recipes' default), "
                        "which needs --method quest, ptq or ptq-timestep (ModelOpt calibrates its own bit-widths); pass --act8-layers 0")
    recipe.validate()
    return recipe


def resolve_recipe(model: str, bits: str, recipe_path: Path | None, target: str | None, timestep_groups: int | None):
    """Recipe (with command-line overrides) and its target profile; all checks that need no model."""
    from quest.profiles import get_profile
    from quest.recipe import load_recipe

    recipe = load_recipe(recipe_key(model), bits, recipe_path)
    if target is not None:
        recipe = replace(recipe, target=target)
    if timestep_groups is not None:
        recipe = replace(recipe, timestep_groups=timestep_groups)
    return recipe, get_profile(recipe.target)


def model_and_calibration(model: str, recipe, profile, calibration: Path | None, device: str = "cpu"):
    """Load the FP model on ``device``, check the recipe against it, then load or record the
    calibration set (its rows moved to ``device`` too)."""
    from quest.quantize import check_recipe
    from quest_export.calibration_data import load_calibration, record_for_model
    from quest_export.models.resolve import load_model

    loaded = load_model(model, device)
    check_recipe(loaded.pipeline.unet, recipe, profile)
    started = time.perf_counter()
    calib = load_calibration(calibration, loaded) if calibration else record_for_model(loaded, recipe.calibration)
    return loaded, calib.to(device), time.perf_counter() - started


RECIPE_ALIASES = {"sd15-shaped": "sd15"}  # models that run another model's recipes


def recipe_key(model: str) -> str:
    """Recipe file prefix for a --model value: the alias itself, or the folder name of a path."""
    key = Path(model.rstrip("/")).name if ("/" in model or os.sep in model) else model
    return RECIPE_ALIASES.get(key, key)


@dataclass
class FinetuneRequest:
    """What ``quest-export finetune`` was asked for (its flags; None: the recipe's own value)."""

    out: Path
    model: str = "digits"
    bits: str = "w8a8"
    method: str = "quest"
    recipe_path: Path | None = None
    target: str | None = None
    calibration: Path | None = None
    stages: str | None = None
    timestep_groups: int | None = None
    grouping: str | None = None
    weight_dilation: bool | None = None
    loss: str | None = None
    calibration_steps: str | None = None
    resume: bool = False
    force: bool = False
    device: str = "auto"
    teacher_dtype: str | None = None
    act8_layers: int | None = None

    @property
    def state_path(self) -> Path:
        """Where a quest finetune keeps its resumable state (beside --out, never inside it)."""
        return self.out.parent / f".{self.out.name}.finetune-state.safetensors"


def plan(request: FinetuneRequest):
    """The recipe and target profile the request runs, every check that needs no model done."""
    from quest_export.quantization import METHODS, check_method_target

    method = request.method
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    recipe, profile = resolve_recipe(request.model, request.bits, request.recipe_path, request.target, request.timestep_groups)
    if request.stages is not None:
        if method != "quest":
            raise UserError("--stages applies only to --method quest")
        only = [s.strip() for s in request.stages.split(",") if s.strip()]
        recipe = replace(recipe, finetune=replace(recipe.finetune, only=only))
    if request.resume and method != "quest":
        raise UserError("--resume applies only to --method quest")
    if request.teacher_dtype is not None and method != "quest":
        raise UserError("--teacher-dtype applies only to --method quest (the other methods keep no teacher)")
    resolve_teacher_dtype(request.teacher_dtype)
    request.device = resolve_device(request.device)
    recipe = apply_option_flags(recipe, method, request.grouping, request.weight_dilation, request.loss, request.calibration_steps,
                                request.act8_layers)
    check_method_target(method, profile.name)
    return recipe, profile


def run(request: FinetuneRequest, recipe, profile, dist, progress: Callable | None = None,
        note: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Quantize with the request's method and write the checkpoint atomically (rank 0); returns
    what was written, or None on other ranks. Raises ``quest.finetune.StopRequested`` when a
    signal stopped the finetuner (its state is saved at ``request.state_path``)."""
    from quest.distributed import rank_device
    from quest_export.quantization import FinetuneRun, checkpoint_meta, quantize_with_method

    device = rank_device(dist, resolve_device(request.device))
    loaded, calib, calib_seconds = model_and_calibration(request.model, recipe, profile, request.calibration, device)
    recorded = calib.meta.get("step_selection", "uniform")
    if request.calibration is not None and request.calibration_steps is not None and recorded != request.calibration_steps:
        raise UserError(
            f"--calibration {request.calibration} was recorded with --calibration-steps {recorded}; "
            f"record one with `quest-export calibrate --calibration-steps {request.calibration_steps}` or drop the flag"
        )
    state_path = request.state_path
    if request.resume and request.method == "quest" and not state_path.is_file():
        note(f"note: no finetuning state at {state_path}; starting from the beginning")
    finetune_run = FinetuneRun(state_path=state_path, resume=request.resume, dist=dist, progress=progress,
                               teacher_dtype=resolve_teacher_dtype(request.teacher_dtype))
    qunet, report = quantize_with_method(loaded, recipe, request.method, calib, finetune_run)
    if not dist.is_main:
        return None
    log = report.pop("log", None)
    options = report.pop("options", {})
    meta = checkpoint_meta(loaded, request.method, calib, {"timings": {"calibration_seconds": round(calib_seconds, 2), **report},
                                                           "world_size": dist.world_size, "options": options,
                                                           "device": device_name(device)})
    write_checkpoint(request.out, qunet, meta, calib if request.calibration is None else None, log,
                     force=request.force or request.resume)
    state_path.unlink(missing_ok=True)
    return {"out": request.out, "method": request.method, "bits": recipe.bits, "target": profile.name, "layers": len(qunet.layers)}


def write_checkpoint(out: Path, qunet, meta: dict[str, Any], calib=None, log: Any = None, force: bool = False) -> None:
    """The checkpoint directory, written atomically: tensors + quant.json, the finetuning log, and
    the calibration set it was made with (when it was recorded for it rather than passed in)."""
    from quest.checkpoint import save_checkpoint
    from quest_export.artifacts import atomic_directory, write_json_atomic
    from quest_export.calibration_data import save_calibration

    with atomic_directory(out, force=force) as tmp:
        save_checkpoint(tmp, qunet, meta)
        if log is not None:
            write_json_atomic(tmp / "finetune_log.json", log)
        if calib is not None:
            save_calibration(tmp, calib)
