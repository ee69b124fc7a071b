"""What the commands print: metric and profile tables, finetuning progress bars."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def print_metrics(result: dict) -> None:
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


@contextlib.contextmanager
def finetune_progress(enabled: bool):
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


def print_op_profile(profile: dict[str, dict[str, dict[str, float]]], rows: int = 12) -> None:
    table = Table(title=f"where the time goes ({profile.get('profiler', 'ONNX Runtime')} profiler, ms per call by op type)")
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


def print_ceiling(ceiling: dict[str, float]) -> None:
    """The bounds the profile sets on the speedup (kernel time, see bench.speed_ceiling)."""
    console.print(
        f"kernel time: FP32 {ceiling['fp32_kernel_ms']:.1f} ms, quantized {ceiling['quantized_kernel_ms']:.1f} ms "
        f"({ceiling['kernel_speedup']:.2f}x). Float work both engines run: {ceiling['shared_float_ms']:.1f} ms "
        f"(attention {ceiling['fp32_attention_ms']:.1f}); integer kernels {ceiling['integer_kernel_ms']:.1f} ms; "
        f"quantization overhead {ceiling['quantization_overhead_ms']:.1f} ms.\n"
        f"speedup ceiling: {ceiling['ceiling_free_integer']:.2f}x if integer kernels and Q/DQ cost nothing, "
        f"{ceiling['ceiling_measured_integer']:.2f}x with the integer kernels at their measured time."
    )


def print_sensitivity(results: list[dict]) -> None:
    table = Table(title="layer-group sensitivity (worst first)")
    for column in ("group", "layers", "mse", "temporal"):
        table.add_column(column)
    for row in results:
        table.add_row(row["group"], str(row["layers"]), f"{row['mse']:.3e}", "yes" if row["temporal"] else "")
    Console().print(table)


def print_bench(result: dict, label: str) -> None:
    """The engine and every float baseline, each with its ratio to the engine (>1: the engine is faster)."""
    table = Table(title=f"latency per UNet call (median) - {label}")
    for column in ("engine", "ms", "engine speedup vs it", "size", "resident memory added"):
        table.add_column(column)
    mib = 1 << 20
    groups = f", {result['group_engines']} group engines" if result.get("group_engines", 1) > 1 else ""
    table.add_row(f"quantized ({result.get('backend', '')}{groups})", f"{result['latency_ms']:.1f}", "",
                  f"{result['size_ratio']:.3f}x FP32 ONNX", f"{result['engine_resident_bytes'] / mib:.0f} MiB")
    for name, entry in result["baselines"].items():
        best = " (fastest FP32)" if name == result["best_fp32"] else ""
        table.add_row(f"{name}{best}", f"{entry['latency_ms']:.1f}", f"{entry['ratio']:.2f}x", "", f"{entry['resident_bytes'] / mib:.0f} MiB")
    console.print(table)
    kernels = result.get("integer_kernels") or {}
    if "kernel_precisions" in kernels:
        console.print(f"layers by runtime precision: {kernels['kernel_precisions']}")
    console.print(f"speedup vs the fastest FP32 engine ({result['best_fp32']}): {result['speedup_vs_best_fp32']:.2f}x; "
                  f"vs the fastest float engine ({result['best_float']}): {result['speedup_vs_best_float']:.2f}x")


def built_line(manifest: dict, out) -> str:
    size = sum(entry["bytes"] for entry in manifest["files"].values()) / (1 << 20)
    status = "verified" if manifest.get("verification") else "NOT verified (--no-verify)"
    return (f"built {manifest['backend']} engine {out} ({size:.2f} MiB, profile {manifest['profile']['name']}, "
            f"{manifest['build_seconds']:.1f} s, {status})")


def verified_line(engine, result: dict) -> str:
    from quest_export.engine.host import describe

    return (f"engine {engine} verified on this host ({describe(result['host'])}): per-call error "
            f"{result['per_call_rel_error']:.3g} (bound {result['bounds']['per_call_rel_error']:.3g}), trajectory PSNR "
            f"{result['trajectory_psnr_db']:.1f} dB (bound {result['bounds']['trajectory_psnr_db']:.1f} dB)")
