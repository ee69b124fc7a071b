"""`quest-export finetune`'s baselines and loading of quantized checkpoints.

Methods (all on the same model and calibration set):
- ``ptq``: one activation scale set for all timesteps, no finetuning;
- ``ptq-timestep``: per-timestep-group activation tables;
- ``modelopt``: NVIDIA ModelOpt's INT8 PTQ (TensorRT arithmetic), converted to a quest checkpoint;
- ``quest``: ``ptq-timestep`` initialisation, then QuEST's two selective finetuning stages.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from quest.calibration import CalibrationSet
from quest.checkpoint import load_checkpoint, read_checkpoint_meta
from quest.distributed import DistContext
from quest.finetune import QuestFinetuner, fp_copy
from quest.ptq import calibrate
from quest.quantize import QuantizedUNet, quantize_unet
from quest.recipe import Recipe
from quest_export.errors import UserError
from quest_export.models.resolve import LoadedModel, load_model, source_of

METHODS = ("ptq", "ptq-timestep", "modelopt", "quest")


def forward_loop_for(calib: CalibrationSet, batch_size: int = 64):
    """ModelOpt-style forward loop over the calibration set."""

    def loop(unet: torch.nn.Module) -> None:
        with torch.no_grad():
            for x, t, states in calib.batches(batch_size):
                unet(x, t, encoder_hidden_states=states)

    return loop


def check_method_target(method: str, target: str) -> None:
    """ModelOpt's PTQ is symmetric INT8: it only has TensorRT's arithmetic."""
    from quest_export.baselines.modelopt_ptq import MODELOPT_TARGET

    if method == "modelopt" and target != MODELOPT_TARGET:
        raise UserError(f"--method modelopt is ModelOpt's symmetric INT8 PTQ (TensorRT arithmetic); use --target {MODELOPT_TARGET}")


def recipe_for_method(recipe: Recipe, method: str) -> Recipe:
    if method == "ptq":
        return replace(recipe, timestep_groups=1)
    if method in ("ptq-timestep", "modelopt", "quest"):
        return recipe
    raise UserError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")


def calibration_fingerprint(calib: CalibrationSet) -> str:
    digest = hashlib.sha256()
    for tensor in (calib.x, calib.t, calib.cond):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class FinetuneRun:
    """How a ``quest`` run is driven: resume state, data parallelism, progress reporting."""

    state_path: Path | None = None
    resume: bool = False
    dist: DistContext | None = None
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None
    teacher_dtype: torch.dtype = torch.float32  # the frozen FP teacher's dtype (the student stays float32)


def apply_fp_options(unet: torch.nn.Module, recipe: Recipe, calib: CalibrationSet) -> dict[str, Any]:
    """Recipe options that transform the FP model before quantization (weight dilation, smoothing)."""
    from quest.dilation import dilate_unet, smooth_unet

    if not recipe.weight_dilation and recipe.smoothing_alpha is None:
        return {}
    started = time.perf_counter()
    if recipe.weight_dilation:
        summary = dilate_unet(unet, calib)
        summary["layers"] = {k: v for k, v in summary["layers"].items() if v["dilated_channels"]}
        return {"weight_dilation": summary, "dilation_seconds": round(time.perf_counter() - started, 2)}
    summary = smooth_unet(unet, calib, float(recipe.smoothing_alpha))
    return {"smoothing": summary, "smoothing_seconds": round(time.perf_counter() - started, 2)}


def select_mixed_precision(unet: torch.nn.Module, recipe: Recipe, calib: CalibrationSet, loop) -> tuple[Recipe, dict[str, Any]]:
    """``act8_layers: K``: rank the layers by activation sensitivity on a PTQ-calibrated copy of the
    (already transformed) FP ``unet`` and record the worst K in the recipe. No-op when K is 0 or the
    recipe already records its selection (a resumed run, a loaded checkpoint)."""
    if recipe.act8_layers == 0 or recipe.act8_selected:
        return recipe, {}
    from quest.mixed_precision import activation_sensitivity, layer_macs, mixed_precision_report, select_act8_layers

    started = time.perf_counter()
    probe = quantize_unet(copy.deepcopy(unet), recipe)
    calibrate(probe, loop)
    ranking = activation_sensitivity(probe, calib, max_rows=recipe.act8_rows)
    del probe
    selected = select_act8_layers(ranking, recipe.act8_layers)
    report = mixed_precision_report(ranking, selected, layer_macs(unet, calib))
    report["seconds"] = round(time.perf_counter() - started, 2)
    return replace(recipe, act8_selected=selected), {"mixed_precision": report}


def init_grouping(qunet: QuantizedUNet, fp_unet: torch.nn.Module | None, calib: CalibrationSet, loop, seed: int) -> dict[str, Any]:
    """``grouping: searched``: PTQ with uniform groups gives the candidate tables, then the search
    installs its lookup (the caller re-runs PTQ for the new groups). No-op for uniform grouping."""
    if qunet.recipe.grouping != "searched":
        return {}
    from quest.grouping import search_grouping

    search = qunet.recipe.grouping_search.with_seed(seed)
    calibrate(qunet, loop)
    report = search_grouping(qunet, fp_unet, calib, search)
    return {"grouping_search": report, "grouping_search_seconds": report.get("seconds", 0.0)}


def quantize_with_method(
    model: LoadedModel, recipe: Recipe, method: str, calib: CalibrationSet, run: FinetuneRun | None = None
) -> tuple[QuantizedUNet, dict[str, Any]]:
    """Quantize ``model.pipeline.unet`` in place with ``method``; returns the handle and a report
    (timings, ``options`` (what the recipe options did), and for ``quest`` the stage loss log)."""
    recipe = recipe_for_method(recipe, method)
    unet = model.pipeline.unet
    loop = forward_loop_for(calib)
    started = time.perf_counter()
    if method == "modelopt" and recipe.act8_layers:
        raise UserError("recipe act8_layers needs --method quest, ptq or ptq-timestep (ModelOpt calibrates its own bit-widths)")
    options = apply_fp_options(unet, recipe, calib)
    recipe, chosen = select_mixed_precision(unet, recipe, calib, loop)
    options |= chosen
    if method == "quest":
        run = run or FinetuneRun()
        settings = recipe.finetune.settings(class_conditional=model.traits.class_conditional)
        fp_unet = fp_copy(unet, run.teacher_dtype)
        qunet = quantize_unet(unet, recipe)
        options |= init_grouping(qunet, fp_unet, calib, loop, settings.seed)
        calibrate(qunet, loop)
        ptq_seconds = time.perf_counter() - started
        fingerprint = f"{calibration_fingerprint(calib)}:{hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:16]}"
        if run.teacher_dtype != torch.float32:  # a resumed run must keep its teacher's dtype
            fingerprint += f":teacher-{str(run.teacher_dtype).removeprefix('torch.')}"
            options["teacher_dtype"] = str(run.teacher_dtype).removeprefix("torch.")
        finetuner = QuestFinetuner(qunet, fp_unet, calib, settings, run.state_path, run.dist, fingerprint)
        log = finetuner.run(resume=run.resume, progress=run.progress)
        report = {
            "ptq_seconds": round(ptq_seconds, 2),
            "finetune_seconds": round(time.perf_counter() - started - ptq_seconds, 2),
            "stages": [s.name for s in settings.stages],
            "loss": settings.loss,
            "log": log,
            "options": options,
        }
        return qunet, report
    if method == "modelopt":
        check_method_target(method, recipe.target)
        from quest_export.baselines.modelopt_ptq import convert_to_quest, run_modelopt

        if recipe.grouping == "searched":
            raise UserError("--grouping searched needs --method quest or ptq-timestep (ModelOpt calibrates one table)")
        qunet = convert_to_quest(unet, run_modelopt(unet, recipe, loop), recipe)
    else:
        fp_unet = fp_copy(unet) if recipe.grouping == "searched" else None
        qunet = quantize_unet(unet, recipe)
        options |= init_grouping(qunet, fp_unet, calib, loop, recipe.finetune.seed)
        calibrate(qunet, loop)
    return qunet, {"ptq_seconds": round(time.perf_counter() - started, 2), "options": options}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def checkpoint_meta(model: LoadedModel, method: str, calib: CalibrationSet, extra: dict[str, Any]) -> dict[str, Any]:
    extra = {**extra, "peak_rss_mb": peak_rss_mb(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # what the finetune held on its GPU at most
        extra["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {
        "model": {"name": model.spec.name, "source": model.spec.source, "content_hash": model.content_hash},
        "method": method,
        "calibration": {k: calib.meta.get(k) for k in ("trajectories", "steps", "guidance", "seed", "scheduler")}
        | {"step_selection": calib.meta.get("step_selection", "uniform"), "selected_timestep": calib.meta.get("selected_timestep")}
        | {"rows": len(calib), "timesteps": calib.timesteps},
        **extra,
    }


def load_quantized(directory: Path, device: str = "cpu") -> tuple[LoadedModel, QuantizedUNet, dict[str, Any]]:
    """Load the FP model a checkpoint was made from on ``device`` and quantize it as saved (checks
    identity). Checkpoints hold CPU tensors, so one finetuned on a GPU loads on any device."""
    meta = read_checkpoint_meta(directory)
    model_info = meta["model"]
    model = load_model(source_of(model_info), device)
    if model_info.get("content_hash") and model.content_hash != model_info["content_hash"]:
        raise UserError(
            f"checkpoint {directory} was made from a different {model_info['name']!r} model (content hash mismatch); "
            "re-create it from this model"
        )
    qunet = load_checkpoint(directory, model.pipeline.unet, meta)
    model.pipeline.unet.eval()
    return model, qunet, meta
