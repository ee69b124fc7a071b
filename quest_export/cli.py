"""The `quest-export` command line (Typer).

Commands stay thin: they validate input before any long work, call one library entry point, and
report. Errors derived from :class:`~quest_export.errors.QuestError` print as one line; a traceback
appears only with ``--debug``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from quest_export import __version__, cli_checks, cli_output, cli_process, finetune_job
from quest_export.cli_output import console
from quest_export.devices import resolve_device
from quest_export.errors import Interrupted, UserError
from quest_export.cli_options import BitsOpt, CalibrationStepsOpt, DeviceOpt, GuidanceOpt, ModelOpt, SeedOpt, StepsOpt, TeacherDtypeOpt
from quest_export.finetune_job import apply_option_flags as _apply_option_flags  # noqa: F401 - tests call it by this name

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
_state = cli_process.state  # --debug, interrupting signal, outputs, locks, resume state


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
    cli_process.state["debug"] = debug


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
    device: DeviceOpt = "auto",
) -> None:
    """Sample a model (or a built engine in its pipeline) with fixed seeds and write a PNG grid."""
    from quest_export.artifacts import check_writable_file

    out = check_writable_file(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end in .png")
    cli_checks.check_finite("--guidance", guidance)
    cli_checks.check_prompts(prompt)
    device = resolve_device(device)
    from quest_export.models.resolve import load_model, resolve_model_spec

    if engine is None:  # an engine's model is known once it is loaded (checked there)
        spec = resolve_model_spec(model)
        cli_checks.check_conditioning(spec.family == "digits", model, prompt, label)
    cli_process.lock_output(out)
    cli_process.threads()
    from quest_export.evaluation.grid import save_grid
    from quest_export.runtime.load import check_engine_shapes, load_engine_model
    from quest_export.sampling import default_guidance, sample_grid

    loaded = load_engine_model(engine) if engine is not None else load_model(model, device)
    cli_checks.check_conditioning(loaded.traits.class_conditional, loaded.spec.name, prompt, label)
    g = default_guidance(guidance, loaded)
    if engine is not None:
        check_engine_shapes(loaded, min(num_images, loaded.traits.images_per_call), g, "--num-images")
    images, layout = sample_grid(loaded, num_images, steps, g, seed, label, prompt)
    save_grid(images, out, **layout)
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
    device: DeviceOpt = "auto",
) -> None:
    """Measure sample quality: FID on the digit classifier's features, label accuracy, the
    real-data floor `fid_real_floor` (held-out real digits vs the reference set) and, for a
    quantized checkpoint, `psnr_vs_fp` (each sample against its FP twin from the same noise)."""
    from quest_export.artifacts import write_json_atomic

    cli_checks.check_finite("--guidance", guidance)
    device = resolve_device(device)
    if sum(x is not None for x in (checkpoint, model, engine)) > 1:
        raise UserError("pass one of --model, --checkpoint or --engine (checkpoints and engines name their own model)")
    if json_out is not None:
        json_out = cli_process.prepare_out_file(json_out)
    from quest_export.evaluation.sources import evaluate_source

    cli_process.threads()
    result = evaluate_source(model=model, checkpoint=checkpoint, engine=engine, num_samples=num_samples, steps=steps, seed=seed,
                             guidance=guidance, batch_size=batch_size, device=device)
    if json_out is not None:
        write_json_atomic(json_out, result)
    cli_output.print_metrics(result)
    if json_out is not None:
        console.print(f"wrote {json_out}")


@app.command()
def calibrate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for calibration.safetensors + calibration.json.")],
    model: ModelOpt = "digits",
    trajectories: Annotated[Optional[int], typer.Option("--trajectories", min=1, help="FP sampling trajectories (samples per step) [default: from the recipe].")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, max=1000, help="Deployment sampler steps; every step is recorded [default: from the recipe].")] = None,
    guidance: GuidanceOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="Seed of the calibration trajectories [default: from the recipe].")] = None,
    calibration_steps: CalibrationStepsOpt = None,
    device: DeviceOpt = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Record a calibration set: (x_t, t, cond, uncond) along the FP model's own sampling
    trajectories with the deployment scheduler. `finetune --calibration DIR` reuses it."""
    from quest_export.calibration_data import record_to_directory, settings_with

    cli_checks.check_choice("--calibration-steps", calibration_steps, "STEP_SELECTIONS")
    cli_checks.check_finite("--guidance", guidance)
    device = resolve_device(device)
    cli_process.prepare_out_dir(out, force)
    cli_process.threads()
    calib = record_to_directory(model, settings_with(trajectories, steps, guidance, seed, calibration_steps), out, force, device)
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
    act8_layers: Annotated[Optional[int], typer.Option("--act8-layers", min=0, help="Mixed precision: this many layers whose low-bit activations hurt most keep 8-bit activations, measured before PTQ (0: none) [default: from the recipe; 8 in the W4A4 recipes].")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="quest only: continue from the last finetuning checkpoint of this --out.")] = False,
    device: DeviceOpt = "auto",
    teacher_dtype: TeacherDtypeOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Quantize a model and write a quantized checkpoint (quant.safetensors + quant.json).

    `quest` initialises per-timestep tables by PTQ, then runs QuEST's two finetuning stages on the
    target profile's simulation; it checkpoints every N steps (and on Ctrl-C) next to --out, and
    `--resume` continues from there. Under `torchrun` it runs data-parallel (rank 0 writes)."""
    from quest.distributed import init_from_env
    from quest.finetune import StopRequested

    request = finetune_job.FinetuneRequest(out, model, bits, method, recipe_path, target, calibration, stages, timestep_groups,
                                           grouping, weight_dilation, loss, calibration_steps, resume, force,
                                           device, teacher_dtype, act8_layers)
    recipe, profile = finetune_job.plan(request)
    dist = init_from_env()
    if dist.is_main:
        cli_process.prepare_out_dir(out, force or resume)
    cli_process.threads()
    cli_process.state["resume_state"] = request.state_path if method == "quest" else None
    with cli_output.finetune_progress(enabled=dist.is_main) as progress:
        try:
            written = finetune_job.run(request, recipe, profile, dist, progress, note=console.print)
        except StopRequested as stop:  # state saved at a step boundary: exit 130, one line naming --resume
            cli_process.state["signal"] = stop.signal_name or cli_process.state["signal"]
            raise Interrupted from None
    if written is not None:
        console.print(f"wrote {out} ({method}, {written['bits']}, target {written['target']}, {written['layers']} quantized layers)")


@app.command()
def sensitivity(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for sensitivity.json and sensitivity.png.")],
    model: ModelOpt = "digits",
    bits: BitsOpt = "w4a8",
    recipe_path: Annotated[Optional[Path], typer.Option("--recipe", help="Recipe YAML [default: recipes/<model>-<bits>.yaml if it exists].")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="tensorrt or onnxruntime [default: from the recipe].")] = None,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Reuse a calibration set from `quest-export calibrate`.")] = None,
    max_rows: Annotated[Optional[int], typer.Option("--max-rows", min=1, help="Use at most this many calibration rows (spread over all timesteps).")] = None,
    device: DeviceOpt = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Rank layer groups by the damage they do when quantized alone (final-output MSE vs FP over
    the calibration timesteps); temporal layers (time-embedding MLP, time_emb_proj) are flagged.
    Writes a JSON ranking and a bar chart."""
    from quest_export.sensitivity_job import run_sensitivity

    recipe, profile = finetune_job.resolve_recipe(model, bits, recipe_path, target, None)
    device = resolve_device(device)
    cli_process.prepare_out_dir(out, force)
    cli_process.threads()
    results = run_sensitivity(model, recipe, profile, calibration, out, max_rows=max_rows, force=force, device=device)
    cli_output.print_sensitivity(results)
    console.print(f"wrote {out / 'sensitivity.json'} and {out / 'sensitivity.png'}")


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
    for sub in ("digits", "digit_classifier"):
        cli_process.prepare_out_dir(out / sub, force=True)
    config = DemoTrainConfig(seed=seed, unet_steps=unet_steps, classifier_epochs=classifier_epochs, threads=os.cpu_count() or 2)
    report = train_demo(out, config, force=force)
    console.print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    console.print(f"wrote {out / 'digits'} and {out / 'digit_classifier'}")


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Quantized checkpoint directory (quant.safetensors + quant.json).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for model.onnx, manifest.json, parity.json.")],
    target: Annotated[str, typer.Option("--target", help="tensorrt (FP16 graph, symmetric INT8 Q/DQ), onnxruntime (uint8 activations, fused integer kernels) or openvino (symmetric INT8 Q/DQ, constant scales, FP32 graph).")] = "onnxruntime",
    timestep_scales: Annotated[str, typer.Option("--timestep-scales", help="table (one graph, per-timestep factors gathered by the timestep input) or per-engine (one graph per timestep group; on tensorrt each group's scale is then one FP16 number, within 2^-11 of the finetuned table form).")] = "table",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Run the graph against the PyTorch simulation and write parity.json.")] = True,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Calibration directory for the parity inputs [default: two fresh FP trajectories].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Export a quantized checkpoint to ONNX with Q/DQ nodes and per-timestep scale tables, and
    prove it against the simulation (integer codes per tensor, output error)."""
    from quest_export.export.exporter import export_checkpoint
    from quest_export.export.report import print_export_summary

    cli_process.prepare_out_dir(out, force)
    result = export_checkpoint(checkpoint, target, out, timestep_scales=timestep_scales, verify=verify,
                               calibration=calibration, force=force, log=lambda line: typer.echo(line, err=True))
    print_export_summary(result.manifest, result.parity)


@app.command("build-engine")
def build_engine_cmd(
    source: Annotated[Path, typer.Argument(help="Exported ONNX directory, or a quantized checkpoint (exported first).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Engine directory to write (e.g. engines/digits-w4a8).")],
    backend: Annotated[str, typer.Option("--backend", help="tensorrt (NVIDIA GPU with TensorRT), onnxruntime (anywhere) or openvino (x86/ARM CPUs; builds openvino-target exports).")] = "onnxruntime",
    profile: Annotated[str, typer.Option("--profile", help="Build profile: a name in engines/ (digits, sd15-512, bench-unet) or a YAML path.")] = "digits",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Run the built engine against the PyTorch simulation on this host and refuse it if it computes something else.")] = True,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Calibration directory for the verification inputs [default: fresh FP trajectories].")] = None,
    verify_samples: Annotated[int, typer.Option("--verify-samples", min=1, max=256, help="Sampling trajectories in the verification.")] = 32,
    timestep_scales: Annotated[str, typer.Option("--timestep-scales", help="When SOURCE is a checkpoint: table (one engine, per-timestep scales gathered in the graph) or per-engine (one engine per timestep group, constant scales; faster on CPU backends). An export directory keeps the form it was exported in.")] = "table",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Compile an exported Q/DQ graph (or one per timestep group) into an engine directory (plan,
    optimised ORT model or OpenVINO IR + manifest.json) and verify the engine against the
    simulation on this host."""
    from quest_export.engine.build import VerifyOptions, build_engine

    cli_process.prepare_out_dir(out, force)
    options = VerifyOptions(enabled=verify, calibration=calibration, samples=verify_samples)
    manifest = build_engine(source, backend, out, profile=profile, force=force, verify=options,
                            timestep_scales=timestep_scales, log=lambda line: typer.echo(line, err=True))
    console.print(cli_output.built_line(manifest, out))


@app.command("verify-engine")
def verify_engine_cmd(
    engine: Annotated[Path, typer.Argument(help="Built engine directory.")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the verification figures here.")] = None,
) -> None:
    """Re-run an engine's stored verification on this host (loading does it by itself when the
    host's integer-kernel class or runtime differs from the one it was verified on)."""
    from quest_export.artifacts import write_json_atomic
    from quest_export.runtime.load import reverify_here

    if json_out is not None:
        json_out = cli_process.prepare_out_file(json_out)
    result = reverify_here(engine)  # refuses with one line when it fails here
    if json_out is not None:
        write_json_atomic(json_out, result)
    console.print(cli_output.verified_line(engine, result))


@app.command()
def bench(
    engine: Annotated[Optional[Path], typer.Option("--engine", help="An onnxruntime or openvino engine directory to time against the float engines of its UNet.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="bench-unet: the built-in SD1.5-shaped UNet, PTQ-quantized on the spot.")] = None,
    bits: Annotated[str, typer.Option("--bits", help="bench-unet only: weight/activation bits (w8a8, w4a8).")] = "w8a8",
    backend: Annotated[str, typer.Option("--backend", help="bench-unet only: the engine backend to quantize for and build (onnxruntime or openvino).")] = "onnxruntime",
    threads: Annotated[int, typer.Option("--threads", min=1, help="Intra-op threads for every engine timed.")] = 2,
    warmup: Annotated[int, typer.Option("--warmup", min=0)] = 3,
    iterations: Annotated[int, typer.Option("--iterations", min=1)] = 15,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the measurements JSON here.")] = None,
    profile: Annotated[bool, typer.Option("--profile", help="Also print where the time goes (the engine backend's own profiler: ONNX Runtime's, or OpenVINO's performance counters; ms per op type, the engine and its backend's FP32 engine) and the speedup ceiling that sets.")] = False,
    baselines: Annotated[str, typer.Option("--baselines", help="Float engines to time: all, or a comma list of onnxruntime-fp32, openvino-fp32, openvino-bf16, openvino-f16 (reduced precisions only where the CPU has them natively). Each holds its own copy of the weights: at SD1.5 size pass onnxruntime-fp32 to stay within memory.")] = "all",
) -> None:
    """Median latency per UNet call of a quantized engine vs the float engines of the same UNet
    (ONNX Runtime FP32, OpenVINO FP32 and native reduced precisions), measured in this run, the
    ratio to the fastest FP32 engine, and the file size ratio."""
    from quest_export.artifacts import write_json_atomic
    from quest_export.engine.bench import bench_engine_dir, bench_unet, check_bench_request, parse_baselines

    check_bench_request(engine, model, bits, backend)
    wanted = parse_baselines(baselines)
    if json_out is not None:
        json_out = cli_process.prepare_out_file(json_out)
    if model is not None:
        result = bench_unet(bits, threads, warmup, iterations, log=lambda line: typer.echo(line, err=True), profile=profile,
                            backend=backend, baselines=wanted)
    else:
        result = bench_engine_dir(engine, threads, warmup, iterations, profile=profile, baselines=wanted)
    cli_output.print_bench(result, str(result.get("engine") or f"bench-unet {bits}"))
    if profile and "profile" in result:
        cli_output.print_op_profile(result["profile"])
        cli_output.print_ceiling(result["ceiling"])
    if json_out is not None:
        write_json_atomic(json_out, result)
        console.print(f"wrote {json_out}")


def main() -> None:
    """Console-script entry point (one-line errors, exit codes and cleanup: cli_process.run_app)."""
    cli_process.state = _state  # this module's state dict is the process's (tests swap it)
    cli_process.run_app(app)


if __name__ == "__main__":
    main()
