"""The `quest-export` command line (Typer).

Commands stay thin: they validate input before any long work, call one library entry point, and
report. Errors derived from :class:`~quest_export.errors.QuestError` print as one line; a traceback
appears only with ``--debug``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from quest.errors import QuantConfigError
from quest_export import __version__
from quest_export.errors import Interrupted, QuestError, UserError

app = typer.Typer(
    name="quest-export",
    help=(
        "Deployment compiler for low-bit diffusion models: QuEST finetuning -> Q/DQ ONNX -> "
        "TensorRT / ONNX Runtime engines -> diffusers runtime. Every command works offline on the "
        "shipped `digits` demo model."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console(stderr=True)
# per-process CLI state: --debug, the signal that interrupted the run, the outputs this command
# writes (for the one-line interruption message), held output locks, a resumable finetuning state
_state: dict = {"debug": False, "signal": None, "outputs": [], "locks": [], "resume_state": None}

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="digits (shipped demo), sd14 / sd15 / sdxl, a local diffusers directory, or a Hugging Face id.",
    ),
]
StepsOpt = Annotated[int, typer.Option("--steps", min=1, max=1000, help="Sampler steps (DDIM for digits, the model's scheduler otherwise).")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="Seed for the initial noise; sample i always gets the same noise.")]
GuidanceOpt = Annotated[
    Optional[float],
    typer.Option("--guidance", min=0.0, help="Classifier-free guidance scale [default: 2.0 for digits, 7.5 otherwise]."),
]


def _threads() -> None:
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("QUEST_THREADS", os.cpu_count() or 1))))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"quest-export {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug


def _lock_output(path: Path) -> None:
    """Hold ``path``'s output lock until the command ends: a second command writing the same
    output refuses (quest_export.locking). Also remembers the output for the interrupt message."""
    import click

    from quest_export.locking import OutputLock

    lock = OutputLock(path).acquire()
    _state["locks"].append(lock)
    _state["outputs"].append((Path(path), Path(path).exists()))
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(lock.release)


def _prepare_out_file(path: Path, force: bool = True) -> Path:
    """An output file (grid, JSON): parent created and writable, lock taken, before any long work."""
    from quest_export.artifacts import check_writable_file

    path = check_writable_file(path, force=True)
    _lock_output(path)
    return check_writable_file(path, force=force)


def _check_finite(flag: str, value: float | None) -> None:
    import math

    if value is not None and not math.isfinite(value):
        raise UserError(f"{flag} {value} is not a finite number; pass e.g. {flag} 2.0")


def _check_prompts(prompts: list[str] | None) -> None:
    for index, text in enumerate(prompts or [], start=1):
        if not text.strip():
            raise UserError(f"--prompt number {index} is empty; pass a non-empty text for every --prompt")


def _check_engine_shapes(loaded, per_call: int, guidance: float, batch_flag: str) -> None:
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


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write the sample grid to.")] = Path("grid.png"),
    model: ModelOpt = "digits",
    label: Annotated[
        Optional[int], typer.Option("--label", min=0, max=9, help="Digits only: draw every image of this digit (default: 0-9 in turn).")
    ] = None,
    prompt: Annotated[
        Optional[list[str]], typer.Option("--prompt", "-p", help="Text-conditioned models: a prompt (repeat for several).")
    ] = None,
    num_images: Annotated[int, typer.Option("--num-images", "-n", min=1, max=1024, help="Images in the grid.")] = 20,
    steps: StepsOpt = 20,
    guidance: GuidanceOpt = None,
    seed: SeedOpt = 0,
    engine: Annotated[Optional[Path], typer.Option("--engine", help="Built engine directory: sample with it as the pipeline's UNet.")] = None,
) -> None:
    """Sample a model (or a built engine in its pipeline) with fixed seeds and write a PNG grid."""
    from quest_export.artifacts import check_writable_file

    out = check_writable_file(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end in .png")
    _check_finite("--guidance", guidance)
    _check_prompts(prompt)
    from quest_export.models.resolve import load_model, resolve_model_spec

    spec = resolve_model_spec(model)
    if spec.family == "digits" and prompt:
        raise UserError("the digits model is label-conditioned; use --label N (0-9) instead of --prompt")
    if spec.family != "digits" and label is not None:
        raise UserError(f"--label applies only to the digits model; use --prompt TEXT with {model}")
    _lock_output(out)
    _threads()
    if engine is not None:
        from quest_export.runtime.load import load_engine_model

        loaded = load_engine_model(engine)
    else:
        loaded = load_model(model)
    from quest_export.sampling import default_guidance

    g = default_guidance(guidance, loaded.is_digits)
    if engine is not None:
        _check_engine_shapes(loaded, min(num_images, 250) if loaded.is_digits else min(num_images, 4), g, "--num-images")
    from quest_export.evaluation.grid import save_grid
    from quest_export.sampling import balanced_labels, sample_digits, sample_prompts

    if loaded.is_digits:
        import torch

        labels = torch.full((num_images,), label) if label is not None else balanced_labels(num_images)
        images = sample_digits(loaded, labels, steps, g, seed, progress=True)
        save_grid(images, out, ncols=10 if label is None else None, upscale=4)
    else:
        prompts = list(prompt or ["a photograph of an astronaut riding a horse"])
        prompts = [prompts[i % len(prompts)] for i in range(max(num_images, len(prompts)))]
        images = sample_prompts(loaded, prompts, steps, g, seed, progress=True)
        save_grid(images, out)
    console.print(f"wrote {out} ({len(images)} images, {steps} steps, guidance {g}, seed {seed})")


@app.command("eval")
def evaluate_cmd(
    model: Annotated[
        Optional[str],
        typer.Option("--model", "-m", help="digits (shipped demo), sd14 / sd15 / sdxl, a local diffusers directory, or a Hugging Face id [default: digits]."),
    ] = None,
    checkpoint: Annotated[
        Optional[Path],
        typer.Option("--checkpoint", "-c", help="Quantized checkpoint directory: evaluate it and add psnr_vs_fp against its FP model."),
    ] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, max=100_000, help="Samples to draw (labels 0-9 in turn).")] = 500,
    steps: StepsOpt = 20,
    guidance: GuidanceOpt = None,
    seed: SeedOpt = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics JSON here.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per pipeline call.")] = 250,
    engine: Annotated[Optional[Path], typer.Option("--engine", help="Built engine directory: evaluate it and add psnr_vs_simulation against its checkpoint's PyTorch simulation.")] = None,
) -> None:
    """Measure sample quality: FID on the digit classifier's features, label accuracy, the
    real-data floor `fid_real_floor` (held-out real digits vs the reference set) and, for a
    quantized checkpoint, `psnr_vs_fp` (each sample against its FP twin from the same noise)."""
    from quest_export.artifacts import write_json_atomic

    _check_finite("--guidance", guidance)
    if sum(x is not None for x in (checkpoint, model, engine)) > 1:
        raise UserError("pass one of --model, --checkpoint or --engine (checkpoints and engines name their own model)")
    if json_out is not None:
        json_out = _prepare_out_file(json_out)
    from quest_export.evaluation.evaluate import evaluate
    from quest_export.models.resolve import load_model
    from quest_export.sampling import default_guidance

    _threads()
    fp_twin = None
    if engine is not None:
        from quest_export.quantization import load_quantized
        from quest_export.runtime.load import load_engine_model

        loaded = load_engine_model(engine)
        _check_engine_shapes(loaded, min(batch_size, num_samples), default_guidance(guidance, loaded.is_digits), "--batch-size")
        source = loaded.pipeline.unet.manifest["source_checkpoint"]
        if not Path(source["path"]).is_dir():
            raise UserError(f"the engine's source checkpoint {source['path']} is gone; psnr_vs_simulation needs it")
        fp_twin, _, meta = load_quantized(Path(source["path"]))
    elif checkpoint is not None:
        from quest_export.quantization import load_quantized

        loaded, _, meta = load_quantized(checkpoint)
        fp_twin = load_model(loaded.spec.name if loaded.is_digits else loaded.spec.source)
    else:
        loaded = load_model(model or "digits")
    result = evaluate(
        loaded, num_samples, steps, seed, default_guidance(guidance, loaded.is_digits), batch_size, progress=True, fp_twin=fp_twin
    )
    if checkpoint is not None:
        result.update({"checkpoint": str(checkpoint), "method": meta.get("method"), "bits": meta["bits"], "target": meta["target"]})
    if engine is not None:
        result["psnr_vs_simulation"] = result.pop("psnr_vs_fp")
        result.update({"engine": str(engine), "backend": loaded.pipeline.unet.backend, "method": meta.get("method"),
                       "bits": meta["bits"], "target": meta["target"]})
    if json_out is not None:
        write_json_atomic(json_out, result)
    _print_metrics(result)
    if json_out is not None:
        console.print(f"wrote {json_out}")


def _print_metrics(result: dict) -> None:
    table = Table(title=f"eval: {result['model']} ({result['num_samples']} samples, {result['steps']} steps, seed {result['seed']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("fid", "fid_real_floor", "label_accuracy", "psnr_vs_fp", "psnr_vs_simulation", "classifier_held_out_accuracy",
                "sampling_seconds"):
        if key in result:
            value = result[key]
            table.add_row(key, "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if result.get("notes"):
        console.print(f"note: {result['notes']}")


BitsOpt = Annotated[str, typer.Option("--bits", "-b", help="Weight and activation bits as wXaY (2-8 each), e.g. w4a8.")]


def _prepare_out_dir(out: Path, force: bool) -> None:
    """Up front: refuse an unwritable parent, take the output lock (another command writing the same
    --out is refused), then refuse an existing output directory without --force."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {parent}: {exc.strerror}; choose another --out") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"{parent} is not writable; choose another --out")
    _lock_output(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it or choose another --out")


CalibrationStepsOpt = Annotated[
    Optional[str],
    typer.Option(
        "--calibration-steps",
        help="uniform (the FP trajectory's x_t at every sampler step) or selected (ADP-DM: every row re-noised from the structural-risk-selected timestep's generated samples) [default: uniform / the recipe].",
    ),
]


def _check_choice(flag: str, value: str | None, choices_name: str) -> None:
    """Refuse a value of a string option that is not one of ``quest.recipe.<choices_name>``."""
    from quest import recipe as recipe_module

    choices = getattr(recipe_module, choices_name)
    if value is not None and value not in choices:
        raise UserError(f"unknown {flag} {value!r}; choose one of: {', '.join(choices)}")


@app.command()
def calibrate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for calibration.safetensors + calibration.json.")],
    model: ModelOpt = "digits",
    trajectories: Annotated[Optional[int], typer.Option("--trajectories", min=1, help="FP sampling trajectories (samples per step) [default: from the recipe].")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, max=1000, help="Deployment sampler steps; every step is recorded [default: from the recipe].")] = None,
    guidance: GuidanceOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="Seed of the calibration trajectories [default: from the recipe].")] = None,
    calibration_steps: CalibrationStepsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Record a calibration set: (x_t, t, cond, uncond) along the FP model's own sampling
    trajectories with the deployment scheduler. `finetune --calibration DIR` reuses it."""
    from quest.recipe import CalibrationSettings

    _check_choice("--calibration-steps", calibration_steps, "STEP_SELECTIONS")
    _check_finite("--guidance", guidance)
    _prepare_out_dir(out, force)
    defaults = CalibrationSettings()
    settings = CalibrationSettings(
        trajectories=trajectories or defaults.trajectories,
        steps=steps or defaults.steps,
        guidance=guidance,
        seed=defaults.seed if seed is None else seed,
        step_selection=calibration_steps or defaults.step_selection,
    )
    from quest_export.artifacts import atomic_directory
    from quest_export.calibration_data import record_for_model, save_calibration
    from quest_export.models.resolve import load_model

    _threads()
    loaded = load_model(model)
    calib = record_for_model(loaded, settings)
    with atomic_directory(out, force=force) as tmp:
        save_calibration(tmp, calib)
    console.print(f"wrote {out} ({len(calib)} rows at {len(calib.timesteps)} timesteps)")


@app.command()
def finetune(
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write (quant.safetensors + quant.json).")],
    model: ModelOpt = "digits",
    bits: BitsOpt = "w8a8",
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="quest (QuEST selective finetuning), ptq (one activation scale set), ptq-timestep (per-timestep-group tables), modelopt (NVIDIA ModelOpt INT8 PTQ).",
        ),
    ] = "quest",
    recipe_path: Annotated[Optional[Path], typer.Option("--recipe", help="Recipe YAML [default: recipes/<model>-<bits>.yaml if it exists].")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="Engine target whose arithmetic is simulated: tensorrt or onnxruntime [default: from the recipe].")] = None,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Reuse a calibration set from `quest-export calibrate` (or a checkpoint dir).")] = None,
    stages: Annotated[Optional[str], typer.Option("--stages", help="quest only: comma-separated stages to run, e.g. temporal or critical [default: both].")] = None,
    timestep_groups: Annotated[Optional[int], typer.Option("--timestep-groups", min=1, max=1000, help="Activation scale sets (1 = one set for all timesteps) [default: from the recipe].")] = None,
    grouping: Annotated[Optional[str], typer.Option("--grouping", help="Timestep groups: uniform (equal intervals) or searched (ADP-DM differentiable search on the calibration loss) [default: from the recipe].")] = None,
    weight_dilation: Annotated[Optional[bool], typer.Option("--weight-dilation/--no-weight-dilation", help="DilateQuant weight dilation folded into the FP model before PTQ (LayerNorm/GroupNorm -> q/k/v, ff, proj_in; to_v -> to_out; GEGLU value -> ff.net.2) [default: from the recipe].")] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", help="quest only: quest (QuEST's selective stages) or blockwise (DilateQuant block-wise distillation of all weights and scales) [default: from the recipe].")] = None,
    calibration_steps: CalibrationStepsOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="quest only: continue from the last finetuning checkpoint of this --out.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Quantize a model and write a quantized checkpoint (quant.safetensors + quant.json).

    `quest` initialises per-timestep tables by PTQ, then runs QuEST's two finetuning stages on the
    target profile's simulation; it checkpoints every N steps (and on Ctrl-C) next to --out, and
    `--resume` continues from there. Under `torchrun` it runs data-parallel (rank 0 writes)."""
    from dataclasses import replace

    from quest_export.quantization import METHODS, check_method_target

    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    recipe, profile = _resolve_recipe(model, bits, recipe_path, target, timestep_groups)
    if stages is not None:
        if method != "quest":
            raise UserError("--stages applies only to --method quest")
        recipe = replace(recipe, finetune={**recipe.finetune, "only": [s.strip() for s in stages.split(",") if s.strip()]})
    if resume and method != "quest":
        raise UserError("--resume applies only to --method quest")
    recipe = _apply_option_flags(recipe, method, grouping, weight_dilation, loss, calibration_steps)
    check_method_target(method, profile.name)
    from quest.distributed import init_from_env

    dist = init_from_env()
    if dist.is_main:
        _prepare_out_dir(out, force or resume)
    from quest_export.artifacts import atomic_directory
    from quest_export.calibration_data import save_calibration
    from quest_export.quantization import checkpoint_meta, quantize_with_method

    loaded, calib, calib_seconds = _model_and_calibration(model, recipe, profile, calibration)
    if calibration is not None and calibration_steps is not None and calib.meta.get("step_selection", "uniform") != calibration_steps:
        raise UserError(
            f"--calibration {calibration} was recorded with --calibration-steps {calib.meta.get('step_selection', 'uniform')}; "
            f"record one with `quest-export calibrate --calibration-steps {calibration_steps}` or drop the flag"
        )
    from quest.finetune import StopRequested
    from quest_export.quantization import FinetuneRun

    state_path = out.parent / f".{out.name}.finetune-state.safetensors"
    if resume and method == "quest" and not state_path.is_file():
        console.print(f"note: no finetuning state at {state_path}; starting from the beginning")
    _state["resume_state"] = state_path if method == "quest" else None
    with _finetune_progress(enabled=dist.is_main) as progress:
        run = FinetuneRun(state_path=state_path, resume=resume, dist=dist, progress=progress)
        try:
            qunet, report = quantize_with_method(loaded, recipe, method, calib, run)
        except StopRequested as stop:
            # the finetuner caught SIGINT/SIGTERM and saved its state at a step boundary: report it
            # like any interruption (exit 130, one line naming the state and --resume)
            _state["signal"] = stop.signal_name or _state["signal"]
            raise Interrupted from None
    if not dist.is_main:
        return
    log = report.pop("log", None)
    options = report.pop("options", {})
    meta = checkpoint_meta(loaded, method, calib, {"timings": {"calibration_seconds": round(calib_seconds, 2), **report}, "world_size": dist.world_size, "options": options})
    from quest.checkpoint import save_checkpoint
    from quest_export.artifacts import write_json_atomic

    with atomic_directory(out, force=force or resume) as tmp:
        save_checkpoint(tmp, qunet, meta)
        if log is not None:
            write_json_atomic(tmp / "finetune_log.json", log)
        if calibration is None:
            save_calibration(tmp, calib)
    state_path.unlink(missing_ok=True)
    console.print(f"wrote {out} ({method}, {recipe.bits}, target {profile.name}, {len(qunet.layers)} quantized layers)")


def _apply_option_flags(recipe, method: str, grouping: str | None, weight_dilation: bool | None, loss: str | None, calibration_steps: str | None):
    """The issue-8 options (`--grouping`, `--weight-dilation`, `--loss`, `--calibration-steps`) on the recipe."""
    from dataclasses import replace

    _check_choice("--grouping", grouping, "GROUPINGS")
    _check_choice("--loss", loss, "FINETUNE_LOSSES")
    _check_choice("--calibration-steps", calibration_steps, "STEP_SELECTIONS")
    if loss is not None and method != "quest":
        raise UserError("--loss applies only to --method quest")
    if grouping is not None:
        recipe = replace(recipe, grouping=grouping)
    if recipe.grouping == "searched" and method == "modelopt":
        raise UserError("--grouping searched needs --method quest or ptq-timestep (ModelOpt calibrates one table)")
    if weight_dilation is not None:
        recipe = replace(recipe, weight_dilation=weight_dilation)
    if loss is not None:
        recipe = replace(recipe, finetune={**recipe.finetune, "loss": loss})
    if calibration_steps is not None:
        recipe = replace(recipe, calibration=replace(recipe.calibration, step_selection=calibration_steps))
    recipe.validate()
    return recipe


@contextlib.contextmanager
def _finetune_progress(enabled: bool):
    """A rich progress bar per finetuning stage (loss, ETA); plain lines when not on a terminal."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if not enabled:
        yield None
        return
    bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int, record: dict) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total, completed=done - 1, info="")
        info = f"loss {record['loss']:.3e} (final {record['final_mse']:.3e}, local {record['local_mse']:.3e})"
        bars.update(tasks[stage], completed=done, info=info)
        if not console.is_terminal and (done % 50 == 0 or done == total):
            console.print(f"{stage} {done}/{total} {info}")

    with bars:
        yield update


def _resolve_recipe(model: str, bits: str, recipe_path: Path | None, target: str | None, timestep_groups: int | None):
    """Recipe (with command-line overrides) and its target profile; all checks that need no model."""
    from dataclasses import replace

    from quest.profiles import get_profile
    from quest.recipe import load_recipe

    recipe = load_recipe(_recipe_key(model), bits, recipe_path)
    if target is not None:
        recipe = replace(recipe, target=target)
    if timestep_groups is not None:
        recipe = replace(recipe, timestep_groups=timestep_groups)
    return recipe, get_profile(recipe.target)


def _model_and_calibration(model: str, recipe, profile, calibration: Path | None):
    """Load the FP model, check the recipe against it, then load or record the calibration set."""
    from quest.quantize import check_recipe
    from quest_export.calibration_data import load_calibration, record_for_model
    from quest_export.models.resolve import load_model

    _threads()
    loaded = load_model(model)
    check_recipe(loaded.pipeline.unet, recipe, profile)
    started = time.perf_counter()
    calib = load_calibration(calibration, loaded) if calibration else record_for_model(loaded, recipe.calibration)
    return loaded, calib, time.perf_counter() - started


@app.command()
def sensitivity(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for sensitivity.json and sensitivity.png.")],
    model: ModelOpt = "digits",
    bits: BitsOpt = "w4a8",
    recipe_path: Annotated[Optional[Path], typer.Option("--recipe", help="Recipe YAML [default: recipes/<model>-<bits>.yaml if it exists].")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="tensorrt or onnxruntime [default: from the recipe].")] = None,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Reuse a calibration set from `quest-export calibrate`.")] = None,
    max_rows: Annotated[Optional[int], typer.Option("--max-rows", min=1, help="Use at most this many calibration rows (spread over all timesteps).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Rank layer groups by the damage they do when quantized alone (final-output MSE vs FP over
    the calibration timesteps); temporal layers (time-embedding MLP, time_emb_proj) are flagged.
    Writes a JSON ranking and a bar chart."""
    from quest.ptq import calibrate as ptq_calibrate
    from quest.quantize import quantize_unet
    from quest.sensitivity import measure_sensitivity, sensitivity_report
    from quest_export.artifacts import atomic_directory, write_json_atomic
    from quest_export.evaluation.sensitivity_plot import plot_sensitivity
    from quest_export.quantization import forward_loop_for

    recipe, profile = _resolve_recipe(model, bits, recipe_path, target, None)
    _prepare_out_dir(out, force)
    loaded, calib, _ = _model_and_calibration(model, recipe, profile, calibration)
    qunet = quantize_unet(loaded.pipeline.unet, recipe, profile)
    ptq_calibrate(qunet, forward_loop_for(calib))
    results = measure_sensitivity(qunet, calib, max_rows=max_rows)
    report_doc = sensitivity_report(results, {"model": loaded.spec.name, "bits": recipe.bits, "target": profile.name, "recipe": recipe.name, "calibration_rows": len(calib)})
    with atomic_directory(out, force=force) as tmp:
        write_json_atomic(tmp / "sensitivity.json", report_doc)
        plot_sensitivity(results, tmp / "sensitivity.png", f"{loaded.spec.name} {recipe.bits} ({profile.name}): output MSE with one group quantized")
    table = Table(title="layer-group sensitivity (worst first)")
    for column in ("group", "layers", "mse", "temporal"):
        table.add_column(column)
    for row in results:
        table.add_row(row["group"], str(row["layers"]), f"{row['mse']:.3e}", "yes" if row["temporal"] else "")
    Console().print(table)
    console.print(f"wrote {out / 'sensitivity.json'} and {out / 'sensitivity.png'}")


def _recipe_key(model: str) -> str:
    """Recipe file prefix for a --model value: the alias itself, or the folder name of a path."""
    return Path(model.rstrip("/")).name if ("/" in model or os.sep in model) else model


@app.command()
def report(
    eval_json: Annotated[list[Path], typer.Argument(help="Eval JSON files written by `quest-export eval --json`.")],
) -> None:
    """Print a markdown results table from eval JSON files (FID, label accuracy, PSNR vs FP)."""
    from quest_export.evaluation.report import results_table

    typer.echo(results_table(eval_json))


@app.command("train-demo")
def train_demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for digits/, digit_classifier/ and train_report.json.")] = Path("out/train-demo"),
    seed: SeedOpt = 0,
    unet_steps: Annotated[int, typer.Option("--unet-steps", min=1, help="UNet optimisation steps.")] = 3000,
    classifier_epochs: Annotated[int, typer.Option("--classifier-epochs", min=1, help="Classifier epochs.")] = 40,
    force: Annotated[bool, typer.Option("--force", help="Replace existing digits/ and digit_classifier/ in --out.")] = False,
) -> None:
    """Reproduce the shipped digits UNet and digit classifier from scratch (seeded; ~30 min on 2 cores).

    To replace the shipped files: --out quest_export/assets --force."""
    from quest_export.models.digits.training import DemoTrainConfig, train_demo

    for sub in ("digits", "digit_classifier"):
        if (out / sub).exists() and not force:
            raise UserError(f"{out / sub} already exists; pass --force to replace it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out}: {exc.strerror}; choose another --out") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"{out} is not writable; choose another --out")
    for sub in ("digits", "digit_classifier"):
        _lock_output(out / sub)
    config = DemoTrainConfig(seed=seed, unet_steps=unet_steps, classifier_epochs=classifier_epochs, threads=os.cpu_count() or 2)
    report = train_demo(out, config, force=force)
    console.print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    console.print(f"wrote {out / 'digits'} and {out / 'digit_classifier'}")


def _quiet_libraries() -> None:
    """Keep library chatter (loading bars, deprecation notes) out of the CLI's output."""
    if "--debug" in sys.argv:
        return
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Quantized checkpoint directory (quant.safetensors + quant.json).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for model.onnx, manifest.json, parity.json.")],
    target: Annotated[str, typer.Option("--target", help="tensorrt (FP16 graph, symmetric INT8 Q/DQ) or onnxruntime (uint8 activations, fused integer kernels).")] = "onnxruntime",
    timestep_scales: Annotated[str, typer.Option("--timestep-scales", help="table (one graph, per-timestep factors gathered by the timestep input) or per-engine (one graph per timestep group).")] = "table",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Run the graph against the PyTorch simulation and write parity.json.")] = True,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Calibration directory for the parity inputs [default: two fresh FP trajectories].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Export a quantized checkpoint to ONNX with Q/DQ nodes and per-timestep scale tables, and
    prove it against the simulation (integer codes per tensor, output error)."""
    from quest_export.export.exporter import export_checkpoint
    from quest_export.export.report import print_export_summary

    _prepare_out_dir(out, force)
    result = export_checkpoint(checkpoint, target, out, timestep_scales=timestep_scales, verify=verify,
                               calibration=calibration, force=force, log=lambda line: typer.echo(line, err=True))
    print_export_summary(result.manifest, result.parity)


@app.command("build-engine")
def build_engine_cmd(
    source: Annotated[Path, typer.Argument(help="Exported ONNX directory, or a quantized checkpoint (exported first).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Engine directory to write (e.g. engines/digits-w4a8).")],
    backend: Annotated[str, typer.Option("--backend", help="tensorrt (NVIDIA GPU with TensorRT) or onnxruntime (anywhere).")] = "onnxruntime",
    profile: Annotated[str, typer.Option("--profile", help="Build profile: a name in engines/ (digits, sd15-512, bench-unet) or a YAML path.")] = "digits",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Run the built engine against the PyTorch simulation on this host and refuse it if it computes something else.")] = True,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Calibration directory for the verification inputs [default: fresh FP trajectories].")] = None,
    verify_samples: Annotated[int, typer.Option("--verify-samples", min=1, max=256, help="Sampling trajectories in the verification.")] = 32,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Compile an exported Q/DQ graph into an engine directory (plan or optimised ORT model +
    manifest.json) and verify the engine against the simulation on this host."""
    from quest_export.engine.build import VerifyOptions, build_engine

    _prepare_out_dir(out, force)
    options = VerifyOptions(enabled=verify, calibration=calibration, samples=verify_samples)
    manifest = build_engine(source, backend, out, profile=profile, force=force, verify=options,
                            log=lambda line: typer.echo(line, err=True))
    size = sum(entry["bytes"] for entry in manifest["files"].values()) / (1 << 20)
    status = "verified" if manifest.get("verification") else "NOT verified (--no-verify)"
    console.print(f"built {backend} engine {out} ({size:.2f} MiB, profile {manifest['profile']['name']}, "
                  f"{manifest['build_seconds']:.1f} s, {status})")


@app.command("verify-engine")
def verify_engine_cmd(
    engine: Annotated[Path, typer.Argument(help="Built engine directory.")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the verification figures here.")] = None,
) -> None:
    """Re-run an engine's stored verification on this host (loading does it by itself when the
    host's integer-kernel class or runtime differs from the one it was verified on)."""
    from quest_export.artifacts import write_json_atomic
    from quest_export.engine.host import describe, host_description
    from quest_export.runtime.engine_unet import EngineUNet

    if json_out is not None:
        json_out = _prepare_out_file(json_out)
    unet = EngineUNet.from_engine(engine, verify="always")  # refuses with one line when it fails here
    result = {**unet.verification, "engine": str(engine), "host": host_description(),
              "verified_at_build_on": unet.manifest["verification"]["host"]}
    if json_out is not None:
        write_json_atomic(json_out, result)
    console.print(f"engine {engine} verified on this host ({describe(result['host'])}): per-call error "
                  f"{result['per_call_rel_error']:.3g} (bound {result['bounds']['per_call_rel_error']:.3g}), trajectory PSNR "
                  f"{result['trajectory_psnr_db']:.1f} dB (bound {result['bounds']['trajectory_psnr_db']:.1f} dB)")


@app.command()
def bench(
    engine: Annotated[Optional[Path], typer.Option("--engine", help="An onnxruntime engine directory to time against its FP32 engine.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="bench-unet: the built-in SD1.5-shaped UNet, PTQ-quantized on the spot.")] = None,
    bits: Annotated[str, typer.Option("--bits", help="bench-unet only: weight/activation bits (w8a8, w4a8).")] = "w8a8",
    threads: Annotated[int, typer.Option("--threads", min=1, help="ONNX Runtime intra-op threads for both engines.")] = 2,
    warmup: Annotated[int, typer.Option("--warmup", min=0)] = 3,
    iterations: Annotated[int, typer.Option("--iterations", min=1)] = 15,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the measurements JSON here.")] = None,
    profile: Annotated[bool, typer.Option("--profile", help="Also print where the time goes (ONNX Runtime's profiler, ms per op type, both engines) and the speedup ceiling that sets.")] = False,
) -> None:
    """Median latency per UNet call of a quantized engine vs the FP32 engine of the same UNet on the
    same backend, measured in this run, and the file size ratio."""
    from quest_export.artifacts import write_json_atomic
    from quest_export.engine.bench import bench_engine_dir, bench_unet

    if (engine is None) == (model is None):
        raise UserError("pass either --engine DIR or --model bench-unet")
    if model is not None and model != "bench-unet":
        raise UserError(f"--model {model!r}: bench builds only the built-in bench-unet; build other models with build-engine and pass --engine")
    if model is not None:
        from quest.recipe import parse_bits

        parse_bits(bits)
    if json_out is not None:
        json_out = _prepare_out_file(json_out)
    if model is not None:
        result = bench_unet(bits, threads, warmup, iterations, log=lambda line: typer.echo(line, err=True), profile=profile)
    else:
        result = bench_engine_dir(engine, threads, warmup, iterations, profile=profile)
    table = Table(title="latency per UNet call (median)")
    for column in ("engine", "quantized ms", "FP32 ms", "speedup", "size ratio"):
        table.add_column(column)
    table.add_row(str(result.get("engine") or f"bench-unet {bits}"), f"{result['latency_ms']:.1f}", f"{result['fp32_latency_ms']:.1f}",
                  f"{result['speedup']:.2f}x", f"{result['size_ratio']:.3f}")
    console.print(table)
    if profile:
        _print_op_profile(result["profile"])
        _print_ceiling(result["ceiling"])
    if json_out is not None:
        write_json_atomic(json_out, result)
        console.print(f"wrote {json_out}")


def _print_op_profile(profile: dict[str, dict[str, dict[str, float]]], rows: int = 12) -> None:
    table = Table(title="where the time goes (ONNX Runtime profiler, ms per call by op type)")
    for column in ("quantized op", "ms", "nodes", "FP32 op", "ms", "nodes"):
        table.add_column(column)
    quantized, fp32 = list(profile["quantized"].items()), list(profile["fp32"].items())
    for i in range(min(rows, max(len(quantized), len(fp32)))):
        cells: list[str] = []
        for ops in (quantized, fp32):
            cells += [ops[i][0], f"{ops[i][1]['ms']:.1f}", str(ops[i][1]["nodes"])] if i < len(ops) else ["", "", ""]
        table.add_row(*cells)
    totals = [f"{sum(v['ms'] for v in profile[k].values()):.1f}" for k in ("quantized", "fp32")]
    table.add_row("total", totals[0], "", "total", totals[1], "")
    console.print(table)


def _print_ceiling(ceiling: dict[str, float]) -> None:
    """The bounds the profile sets on the speedup (kernel time, see bench.speed_ceiling)."""
    console.print(
        f"kernel time: FP32 {ceiling['fp32_kernel_ms']:.1f} ms, quantized {ceiling['quantized_kernel_ms']:.1f} ms "
        f"({ceiling['kernel_speedup']:.2f}x). Float work both engines run: {ceiling['shared_float_ms']:.1f} ms "
        f"(attention {ceiling['fp32_attention_ms']:.1f}); integer kernels {ceiling['integer_kernel_ms']:.1f} ms; "
        f"quantization overhead {ceiling['quantization_overhead_ms']:.1f} ms.\n"
        f"speedup ceiling: {ceiling['ceiling_free_integer']:.2f}x if integer kernels and Q/DQ cost nothing, "
        f"{ceiling['ceiling_measured_integer']:.2f}x with the integer kernels at their measured time."
    )


def _on_signal(signum: int, _frame: object) -> None:
    """SIGINT and SIGTERM both raise KeyboardInterrupt (as Interrupted), so every cleanup runs."""
    _state["signal"] = signal.Signals(signum).name
    raise Interrupted


def _install_signal_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # not the main thread
            pass


def _interrupted_line() -> str:
    """One line for an interrupted command: which signal, what happened to its outputs, how to resume."""
    parts = [f"interrupted by {_state['signal'] or 'SIGINT'}"]
    for path, existed in _state["outputs"]:
        parts.append(f"partial output removed, {path} " + ("keeps its previous content" if existed else "was not written"))
    state = _state.get("resume_state")
    if state is not None and Path(state).is_file():
        parts.append(f"the finetuning state is kept in {state}: rerun the same command with --resume")
    return "error: " + "; ".join(parts)


def _log_dir() -> Path:
    """Where failure logs go: $QUEST_EXPORT_LOG_DIR, else $XDG_CACHE_HOME (or ~/.cache)/quest-export/logs."""
    if os.environ.get("QUEST_EXPORT_LOG_DIR"):
        return Path(os.environ["QUEST_EXPORT_LOG_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "quest-export" / "logs"


def _write_failure_log(exc: BaseException) -> Path | None:
    """The full traceback of a runtime failure, with the command line and versions; its path or None."""
    import platform
    import tempfile
    import traceback

    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "quest-export")
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{os.getpid()}.log"
    text = "".join([
        f"command: {' '.join(sys.argv)}\n",
        f"quest-export {__version__}, Python {platform.python_version()}, {platform.platform()}\n",
        f"time: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n\n",
        *traceback.format_exception(type(exc), exc, exc.__traceback__),
    ])
    for directory in (_log_dir(), Path(tempfile.gettempdir()) / "quest-export-logs"):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(text)
            return directory / name
        except OSError:
            continue
    return None


def _disk_full(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain that says the disk (or quota) is full, if any."""
    import errno

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        text = str(current)
        if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text:
            return current
        current = current.__cause__ or current.__context__
    return None


def _runtime_failure_line(exc: BaseException) -> str:
    """One line for a runtime failure (exit 1), naming the log that holds the traceback."""
    log = _write_failure_log(exc)
    where = f"traceback in {log}" if log is not None else "no log could be written"
    full = _disk_full(exc)
    if full is not None:
        written = ", ".join(str(p) for p, _ in _state["outputs"]) or getattr(full, "filename", None) or "the output"
        return (f"error: no space left on device while writing {written}; free space or choose another --out "
                f"(partial output removed; {where})")
    if isinstance(exc, QuestError):
        return f"error: {exc} ({where})"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"error: {type(exc).__name__}: {first} ({where}; rerun with --debug to print it)"


def _release_locks() -> None:
    while _state["locks"]:
        _state["locks"].pop().release()


def main() -> None:
    """Console-script entry point: run the app; user errors exit 2 with one line, runtime failures
    exit 1 with one line naming a log file, interruptions (SIGINT, SIGTERM) exit 130 after cleanup."""
    _quiet_libraries()
    _install_signal_handlers()
    try:
        app()
    except SystemExit as exc:
        if exc.code == 130:  # Typer turns KeyboardInterrupt into exit 130 after the cleanup ran
            print(_interrupted_line(), file=sys.stderr)
        raise
    except KeyboardInterrupt:  # raised outside Typer's handling (e.g. while starting up)
        print(_interrupted_line(), file=sys.stderr)
        sys.exit(130)
    except (QuestError, QuantConfigError) as exc:
        if _state["debug"]:
            raise
        code = getattr(exc, "exit_code", 2)
        print(_runtime_failure_line(exc) if code == 1 else f"error: {exc}", file=sys.stderr)
        sys.exit(code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if _state["debug"]:
            raise
        print(_runtime_failure_line(exc), file=sys.stderr)
        sys.exit(1)
    finally:
        _release_locks()


if __name__ == "__main__":
    main()
