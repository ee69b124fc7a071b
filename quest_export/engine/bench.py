"""``quest-export bench``: latency per UNet call of an engine vs the FP32 engine of the same UNet,
on the same backend, measured in one run (alternating blocks of calls after warm-up), plus the size ratio.

The FP32 engine gets every ONNX Runtime optimisation that is not quantization (attention and
GELU fusions, constant folding), so the ratio is what quantization buys.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quest_export.engine import onnxruntime_backend, storage
from quest_export.errors import UserError
from quest_export.onnx_io import graph_bytes, inference_session, save_graph


def _timed(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) * 1000.0


BLOCK = 5


def measure(quantized: Callable[[], Any], fp32: Callable[[], Any], warmup: int, iterations: int,
            block: int = BLOCK) -> dict[str, float]:
    """Median milliseconds per call of each engine, over ``iterations`` timed calls each.

    Calls run in alternating blocks (so a load change on the machine hits both alike), and the
    first call of every block is not timed: after a call, ONNX Runtime's intra-op threads keep
    spinning for a while, and a call of the other session started in that window competes with them
    for the cores. Timing strictly alternating calls measured both engines 1.7-1.9x slower than
    either runs alone (digits, 2 threads)."""
    for _ in range(warmup):
        quantized()
        fp32()
    times: dict[str, list[float]] = {"q": [], "f": []}
    order = [("q", quantized), ("f", fp32)]
    while len(times["q"]) < iterations:
        for key, run in order:
            run()  # absorbs the other session's spinning threads
            times[key] += [_timed(run) for _ in range(min(block, iterations - len(times[key])))]
        order.reverse()
    q_times, f_times = times["q"], times["f"]
    q, f = statistics.median(q_times), statistics.median(f_times)
    return {"latency_ms": q, "fp32_latency_ms": f, "speedup": f / q,
            "latency_ms_spread": [min(q_times), max(q_times)], "fp32_latency_ms_spread": [min(f_times), max(f_times)]}


def op_profile(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray], threads: int, calls: int = 8) -> dict[str, dict[str, float]]:
    """Where one call's time goes: ONNX Runtime's profiler, kernel time summed per op type (ms per
    call and node count) over ``calls`` calls after an uncounted warm-up call (which also absorbs
    another session's spinning threads, see :func:`measure`). The profiler's own overhead inflates
    small ops a little; compare op types, not the total with the timed latency."""
    import json
    import os

    with tempfile.TemporaryDirectory(prefix="quest-profile-") as tmp:
        options = onnxruntime_backend.session_options(threads, True, optimize=False)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = inference_session(model, options, ["CPUExecutionProvider"])
        for _ in range(calls + 1):
            session.run(None, feeds)
        trace_file = session.end_profiling()
        events = json.loads(Path(trace_file).read_text())
        os.unlink(trace_file)
    return _per_op(events, calls)


def _per_op(events: list[dict[str, Any]], calls: int) -> dict[str, dict[str, float]]:
    """Kernel time per op type per call, from the runs after the first (the warm-up)."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    counted_from = starts[-calls] if len(starts) >= calls else 0
    per_op: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= counted_from:
            entry = per_op.setdefault(event["args"]["op_name"], [0.0, 0.0])
            entry[0] += event["dur"] / 1000.0
            entry[1] += 1
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1][0])
    return {op: {"ms": round(total / calls, 2), "nodes": int(count // calls)} for op, (total, count) in ranked}


# What the FP32 engine runs that quantization replaces: its convolution/GEMM kernels and the NCHWc
# reorders that exist only for its convolutions. Everything else it runs (attention, norms, GELU/SiLU,
# residual adds, reshapes) the quantized engine runs too, in float, because the simulation does.
FLOAT_GEMM_OPS = frozenset({"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "ReorderInput", "ReorderOutput"})
INTEGER_OPS = frozenset({"QLinearConv", "MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul"})


def speed_ceiling(profile: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """Upper bounds on the kernel-time speedup, from one :func:`op_profile` of each engine.

    ``ceiling_free_integer`` is FP32 kernel time over the float work both engines share: the speedup if
    every integer kernel and every Q/DQ cost nothing. ``ceiling_measured_integer`` adds the integer
    kernels at their measured time. ``quantization_overhead_ms`` is what the quantized engine spends
    beyond both (Q/DQ, layout transposes, per-timestep scale gathers, extra bias adds): the only part
    export and engine passes can still shrink without new kernels.
    """
    def total(ops: dict[str, dict[str, float]], keep: Callable[[str], bool] = lambda op: True) -> float:
        return sum(entry["ms"] for op, entry in ops.items() if keep(op))

    fp32_ms, quantized_ms = total(profile["fp32"]), total(profile["quantized"])
    shared = total(profile["fp32"], lambda op: op not in FLOAT_GEMM_OPS)
    integer = total(profile["quantized"], lambda op: op in INTEGER_OPS)
    attention = total(profile["fp32"], lambda op: op in ("MultiHeadAttention", "Attention", "Softmax"))
    return {
        "fp32_kernel_ms": round(fp32_ms, 2),
        "quantized_kernel_ms": round(quantized_ms, 2),
        "kernel_speedup": round(fp32_ms / quantized_ms, 3) if quantized_ms else float("nan"),
        "shared_float_ms": round(shared, 2),
        "fp32_attention_ms": round(attention, 2),
        "integer_kernel_ms": round(integer, 2),
        "quantization_overhead_ms": round(quantized_ms - shared - integer, 2),
        "ceiling_free_integer": round(fp32_ms / shared, 3) if shared else float("inf"),
        "ceiling_measured_integer": round(fp32_ms / (shared + integer), 3) if shared + integer else float("inf"),
    }


def fp32_engine(source: Path, directory: Path, ort_settings: dict[str, Any]) -> tuple[Path, int]:
    """Build the ORT engine of the saved FP32 graph ``source`` (same optimisations as the quantized one)."""
    out = directory / "fp32-engine"
    out.mkdir()
    onnxruntime_backend.build_model(source, out, ort_settings, keep_readable=False)
    return out / onnxruntime_backend.MODEL_FILE, graph_bytes(source)


def bench_sessions(engine_model: Path, fp32_source: Path, feeds: dict[str, np.ndarray], threads: int,
                   warmup: int, iterations: int, profile: bool = False) -> dict[str, Any]:
    """Time the quantized engine against the FP32 engine built here from the FP32 graph saved at
    ``fp32_source`` (graphs on disk, not in memory: an SD1.5 FP32 graph is 3.4 GB)."""
    settings = {"intra_op_threads": threads, "memory_arena": True}
    with tempfile.TemporaryDirectory(prefix="quest-bench-") as tmp:
        fp32_model, fp32_onnx_bytes = fp32_engine(fp32_source, Path(tmp), settings)
        options = onnxruntime_backend.session_options(threads, True, optimize=False)
        q_model, f_model = storage.engine_session_source(str(engine_model)), storage.engine_session_source(str(fp32_model))
        q_session = inference_session(q_model, options, ["CPUExecutionProvider"])
        f_session = inference_session(f_model, options, ["CPUExecutionProvider"])
        fp32_engine_bytes = graph_bytes(fp32_model)
        result = measure(lambda: q_session.run(None, feeds), lambda: f_session.run(None, feeds), warmup, iterations)
        if profile:
            result["profile"] = {"quantized": op_profile(q_model, feeds, threads), "fp32": op_profile(f_model, feeds, threads)}
            result["ceiling"] = speed_ceiling(result["profile"])
    engine_bytes = graph_bytes(Path(engine_model))
    result.update({
        "engine_bytes": engine_bytes,
        "fp32_onnx_bytes": fp32_onnx_bytes,
        "fp32_engine_bytes": fp32_engine_bytes,
        "size_ratio": engine_bytes / fp32_onnx_bytes,
        "threads": threads,
        "warmup": warmup,
        "iterations": iterations,
        "batch": int(feeds["sample"].shape[0]),
        "sample_shape": list(feeds["sample"].shape),
    })
    return result


def bench_unet(bits: str, threads: int, warmup: int, iterations: int, log: Callable[[str], None] = print,
               profile: bool = False) -> dict[str, Any]:
    """``--model bench-unet``: plain PTQ (one scale set) on random inputs, export with parity check,
    ORT engine, timed against its FP32 engine."""
    import torch

    from quest.recipe import load_recipe
    from quest_export import api
    from quest_export.export.exporter import linear_kernel_count
    from quest_export.export.kernels import integer_kernel_report
    from quest_export.models.bench_unet import BATCH, TOKENS, build_bench_unet, random_unet_inputs
    from quest_export.quantization import recipe_for_method

    started = time.perf_counter()
    recipe = recipe_for_method(load_recipe("bench-unet", bits), "ptq")
    calib = random_unet_inputs(8)

    def forward_loop(unet: torch.nn.Module) -> None:
        with torch.no_grad():
            for i in range(0, 8, 4):
                unet(calib[0][i : i + 4], calib[1][i : i + 4], encoder_hidden_states=calib[2][i : i + 4])

    log(f"bench-unet {bits}: PTQ calibration ...")
    qunet = api.quantize_unet(build_bench_unet(), recipe, "onnxruntime", forward_loop)
    log("exporting and verifying against the simulation ...")
    exported = api.export_unet(qunet, random_unet_inputs(2, seed=2), batch=BATCH, tokens=TOKENS, check_optimized=False)
    check = exported.reports["model"]
    if not check["passed"]:
        raise UserError(f"bench-unet export failed its parity check (min code agreement {check['min_code_agreement']:.5f})")
    sample, timestep, states = random_unet_inputs(BATCH, seed=3)
    feeds = {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": states.numpy()}
    with tempfile.TemporaryDirectory(prefix="quest-bench-unet-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_graph(exported.graphs["model"], path)
        engine_dir = Path(tmp) / "engine"
        engine_dir.mkdir()
        onnxruntime_backend.build_model(path, engine_dir, {"intra_op_threads": threads})
        kernels = integer_kernel_report(path, linear_kernel_count(exported.records))
        log(f"timing {iterations} calls each after {warmup} warm-up calls ...")
        save_graph(exported.float_graph, Path(tmp) / "fp32.onnx")
        result = bench_sessions(engine_dir / onnxruntime_backend.MODEL_FILE, Path(tmp) / "fp32.onnx", feeds,
                                threads, warmup, iterations, profile)
    result.update({"model": "bench-unet", "bits": bits, "backend": "onnxruntime", "method": "ptq",
                   "parity_min_code_agreement": check["min_code_agreement"], "integer_kernels": kernels,
                   "total_seconds": round(time.perf_counter() - started, 1)})
    return result


def bench_engine_dir(directory: Path, threads: int, warmup: int, iterations: int, profile: bool = False) -> dict[str, Any]:
    """An ONNX Runtime engine directory against the FP32 engine of its source checkpoint's UNet."""
    import torch

    from quest_export.engine.manifest import check_backend, read_engine_manifest
    from quest_export.engine.profiles import BuildProfile
    from quest_export.errors import UserError
    from quest_export.export import passes, trace
    from quest_export.quantization import load_quantized

    manifest = read_engine_manifest(directory)
    check_backend(manifest, "onnxruntime")
    checkpoint = Path(manifest["source_checkpoint"]["path"])
    if not checkpoint.is_dir():
        raise UserError(f"the engine's source checkpoint {checkpoint} is gone; bench needs it to build the FP32 engine")
    _, qunet, _ = load_quantized(checkpoint)
    profile = BuildProfile.from_dict(manifest["profile"])
    config = manifest["unet_config"]
    generator = torch.Generator().manual_seed(3)
    batch, size, tokens = profile.batch.opt, profile.latent.opt, profile.tokens.opt
    feeds = {
        "sample": torch.randn(batch, config["in_channels"], size, size, generator=generator).numpy(),
        "timestep": torch.full((batch,), 500.0).numpy(),
        "encoder_hidden_states": torch.randn(batch, tokens, config["cross_attention_dim"], generator=generator).numpy(),
    }
    marked, _ = trace.trace_marked_graph(qunet, trace.example_inputs(qunet.unet, batch=batch, tokens=tokens))
    del qunet  # from here on only graphs on disk and the two sessions are held
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="quest-bench-fp32-") as tmp:
        float_graph = passes.strip_markers(marked)
        del marked
        save_graph(float_graph, Path(tmp) / "fp32.onnx")
        del float_graph
        result = bench_sessions(Path(directory) / manifest["model_file"], Path(tmp) / "fp32.onnx", feeds, threads, warmup,
                                iterations, profile)
    result.update({"engine": str(directory), "backend": "onnxruntime", "bits": manifest["source_checkpoint"].get("bits")})
    return result


def check_bench_request(engine: Path | None, model: str | None, bits: str) -> None:
    """``bench`` times either a built engine or the built-in bench-unet at ``bits``."""
    from quest.recipe import parse_bits

    if (engine is None) == (model is None):
        raise UserError("pass either --engine DIR or --model bench-unet")
    if model is not None and model != "bench-unet":
        raise UserError(f"--model {model!r}: bench builds only the built-in bench-unet; build other models with build-engine and pass --engine")
    if model is not None:
        parse_bits(bits)
