"""``quest-export bench``: latency per UNet call of an engine vs the float engines a CPU user could
run instead (ONNX Runtime FP32, OpenVINO FP32, OpenVINO in the reduced float precisions the CPU
computes natively), all of the same UNet, measured in one run (blocks of calls in rotating order
after warm-up), plus the size ratio.

The ONNX Runtime FP32 engine gets every optimisation that is not quantization (attention and GELU
fusions, constant folding); OpenVINO compiles the same FP32 graph. The ratio to the fastest of them
is what quantization buys over the best float engine on the host.
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


def resident_bytes() -> int:
    """This process's resident memory now."""
    import psutil

    gc.collect()
    return int(psutil.Process().memory_info().rss)


_RUNTIMES_LOADED: list[bool] = []


def load_runtimes() -> None:
    """Open and run a one-node model in ONNX Runtime and (where installed) OpenVINO once, so that the
    runtimes' own libraries and thread pools (~70 MiB for OpenVINO's CPU plugin) are not counted
    as the first engine's memory."""
    if _RUNTIMES_LOADED:
        return
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    tiny = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.zeros((1, 4), np.float32)}
    inference_session(tiny, onnxruntime_backend.session_options(1), ["CPUExecutionProvider"]).run(None, feeds)
    try:
        import openvino

        core = openvino.Core()
        core.compile_model(core.read_model(tiny.SerializeToString(), b""), "CPU").create_infer_request().infer(feeds)
    except ImportError:
        pass
    _RUNTIMES_LOADED.append(True)


def opened_with_memory(open_call: Callable[[], Callable[..., Any]], feeds: dict[str, np.ndarray]) -> tuple[Callable[..., Any], int]:
    """``open_call()`` (an engine's call on feeds) and the resident memory that opening it and one
    call on ``feeds`` added to this process: the engine's weights, prepacked kernels and buffers.
    (An estimate: the allocator may reuse memory freed earlier, so it can read low, never high by
    more than the feeds' outputs; the runtimes' own libraries are loaded beforehand and not counted.)"""
    load_runtimes()
    before = resident_bytes()
    call = open_call()
    call(feeds)
    return call, max(0, resident_bytes() - before)


def measure_engines(runs: dict[str, Callable[[], Any]], warmup: int, iterations: int,
                    block: int = BLOCK) -> dict[str, dict[str, Any]]:
    """Median milliseconds per call of each engine in ``runs``, over ``iterations`` timed calls each.

    Calls run in blocks, engine after engine, the order rotated every round (so a load change on
    the machine hits all alike), and the first call of every block is not timed: after a call,
    ONNX Runtime's and OpenVINO's intra-op threads keep spinning for a while, and a call of another
    engine started in that window competes with them for the cores. Timing strictly alternating
    calls measured two engines 1.7-1.9x slower than either runs alone (digits, 2 threads)."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    while any(len(t) < iterations for t in times.values()):
        for name in order:
            run = runs[name]
            run()  # absorbs the previous engine's spinning threads
            times[name] += [_timed(run) for _ in range(min(block, iterations - len(times[name])))]
        order = order[1:] + order[:1]
    return {name: {"latency_ms": statistics.median(t), "latency_ms_spread": [min(t), max(t)]} for name, t in times.items()}


def op_profile(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray], threads: int, calls: int = 8) -> dict[str, dict[str, float]]:
    """Where one call's time goes: ONNX Runtime's profiler, kernel time summed per op type (ms per
    call and node count) over ``calls`` calls after an uncounted warm-up call (which also absorbs
    another session's spinning threads, see :func:`measure_engines`). The profiler's own overhead inflates
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
ATTENTION_OPS = frozenset({"MultiHeadAttention", "Attention", "Softmax"})


def ort_op_kind(op: str) -> str:
    """What an ONNX Runtime profile entry is to :func:`speed_ceiling`."""
    if op in FLOAT_GEMM_OPS:
        return "gemm"
    if op in INTEGER_OPS:
        return "integer"
    return "attention" if op in ATTENTION_OPS else "other"


def speed_ceiling(profile: dict[str, dict[str, dict[str, float]]], op_kind: Callable[[str], str] = ort_op_kind) -> dict[str, float]:
    """Upper bounds on the kernel-time speedup, from one op profile of each engine; ``op_kind``
    names each entry ``gemm`` (float work quantization replaces), ``integer``, ``attention`` or
    ``other`` (the backend's own op names: :func:`ort_op_kind`, OpenVINO's ``op_kind``).

    ``ceiling_free_integer`` is FP32 kernel time over the float work both engines share: the speedup if
    every integer kernel and every Q/DQ cost nothing. ``ceiling_measured_integer`` adds the integer
    kernels at their measured time. ``quantization_overhead_ms`` is what the quantized engine spends
    beyond both (Q/DQ, layout transposes, per-timestep scale gathers, extra bias adds): the only part
    export and engine passes can still shrink without new kernels.
    """
    def total(ops: dict[str, dict[str, float]], keep: Callable[[str], bool] = lambda op: True) -> float:
        return sum(entry["ms"] for op, entry in ops.items() if keep(op))

    fp32_ms, quantized_ms = total(profile["fp32"]), total(profile["quantized"])
    shared = total(profile["fp32"], lambda op: op_kind(op) != "gemm")
    integer = total(profile["quantized"], lambda op: op_kind(op) == "integer")
    attention = total(profile["fp32"], lambda op: op_kind(op) == "attention")
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


def fp32_engine(source: Path, directory: Path, ort_settings: dict[str, Any]) -> Path:
    """Build the ORT engine of the saved FP32 graph ``source`` (same optimisations as the quantized
    one) under ``directory``; returns its model file (:func:`fp32_engine_model`)."""
    out = fp32_engine_model(directory).parent
    out.mkdir()
    onnxruntime_backend.build_model(source, out, ort_settings, keep_readable=False)
    return fp32_engine_model(directory)


def fp32_engine_model(directory: Path) -> Path:
    """Where :func:`fp32_engine` puts the FP32 ORT engine's model under ``directory``."""
    return Path(directory) / "fp32-engine" / onnxruntime_backend.MODEL_FILE


FLOAT_BASELINES = ("onnxruntime-fp32", "openvino-fp32", "openvino-bf16", "openvino-f16")


def parse_baselines(text: str) -> tuple[str, ...]:
    """``--baselines``: ``all`` or a comma list of :data:`FLOAT_BASELINES` (the ONNX Runtime FP32
    engine is always timed: it is the reference every ratio falls back to)."""
    if text == "all":
        return FLOAT_BASELINES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FLOAT_BASELINES]
    if unknown or not names:
        raise UserError(f"--baselines {text!r}: choose 'all' or a comma list of {', '.join(FLOAT_BASELINES)}")
    return tuple(n for n in FLOAT_BASELINES if n in names or n == "onnxruntime-fp32")


def float_baselines(fp32_source: Path, directory: Path, threads: int, feeds: dict[str, np.ndarray],
                    wanted: tuple[str, ...] = FLOAT_BASELINES) -> dict[str, tuple[Callable[..., Any], int, int]]:
    """The float engines a CPU user could run instead, built from the FP32 graph: ONNX Runtime
    FP32 (every optimisation but quantization), OpenVINO FP32, and OpenVINO in each reduced float
    precision this CPU computes natively (bf16 on AVX512_BF16/AMX). Name -> (call on numpy
    inputs, engine bytes, resident memory it added: :func:`opened_with_memory`), for the names in
    ``wanted`` (each holds a copy of the weights: at SD size, pick fewer); OpenVINO's entries only
    where it is installed."""
    settings = {"intra_op_threads": threads, "memory_arena": True}
    fp32_model = fp32_engine(fp32_source, directory, settings)

    def ort_fp32() -> Callable[..., Any]:
        options = onnxruntime_backend.session_options(threads, True, optimize=False)
        session = inference_session(storage.engine_session_source(str(fp32_model)), options, ["CPUExecutionProvider"])
        return lambda feeds: session.run(None, feeds)

    call, resident = opened_with_memory(ort_fp32, feeds)
    baselines: dict[str, tuple[Callable[..., Any], int, int]] = {"onnxruntime-fp32": (call, graph_bytes(fp32_model), resident)}
    try:
        from quest_export.engine import openvino_backend

        openvino_backend.require()
    except UserError:
        return baselines
    for precision in ["f32", *openvino_backend.native_float_precisions()]:
        name = "openvino-fp32" if precision == "f32" else f"openvino-{precision}"
        if name not in wanted:
            continue

        def openvino_call(precision: str = precision) -> Callable[..., Any]:
            request = openvino_backend.compile_onnx(fp32_source, threads, precision).create_infer_request()
            return lambda feeds: request.infer(feeds)

        call, resident = opened_with_memory(openvino_call, feeds)
        baselines[name] = (call, graph_bytes(fp32_source), resident)  # reads the FP32 graph
    return baselines


def bench_against_baselines(engine: tuple[Callable[..., Any], int], engine_backend: Any, engine_model: Path, engine_bytes: int,
                            fp32_source: Path, feeds: dict[str, np.ndarray], threads: int, warmup: int, iterations: int,
                            profile: bool = False, baselines: tuple[str, ...] = FLOAT_BASELINES) -> dict[str, Any]:
    """Time the quantized engine against every float baseline (:func:`float_baselines`) in one
    run. ``speedup`` is against the FP32 engine of the engine's own backend,
    ``speedup_vs_best_fp32`` against the fastest FP32 engine, ``speedup_vs_best_float`` against the
    fastest of all (reduced precisions included). ``--profile`` adds where the engine's and its
    backend's FP32 engine's time goes, by the backend's own profiler (``engine_backend``: a
    :class:`~quest_export.engine.backends.Backend`), and the ceiling that sets. ``engine``: the
    engine's call and the resident memory it added (:func:`opened_with_memory`)."""
    engine_call, engine_rss = engine
    fp32_onnx_bytes = graph_bytes(fp32_source)
    with tempfile.TemporaryDirectory(prefix="quest-bench-") as tmp:
        engines = float_baselines(fp32_source, Path(tmp), threads, feeds, baselines)
        runs = {"engine": lambda: engine_call(feeds), **{name: (lambda call=call: call(feeds)) for name, (call, _, _) in engines.items()}}
        timed = measure_engines(runs, warmup, iterations)
        result: dict[str, Any] = {}
        if profile:
            fp32_models = {"onnx": fp32_source, "onnxruntime": fp32_engine_model(Path(tmp))}
            result["profile"] = engine_backend.op_profiles(engine_model, fp32_models, feeds, threads)
            result["ceiling"] = speed_ceiling(result["profile"], engine_backend.impl.op_kind)
    latency = timed["engine"]["latency_ms"]
    table = {name: {"latency_ms": timed[name]["latency_ms"], "latency_ms_spread": timed[name]["latency_ms_spread"],
                    "engine_bytes": size, "resident_bytes": rss, "ratio": timed[name]["latency_ms"] / latency}
             for name, (_, size, rss) in engines.items()}
    own = f"{engine_backend.name}-fp32" if f"{engine_backend.name}-fp32" in table else "onnxruntime-fp32"
    best_fp32 = min((n for n in table if n.endswith("-fp32")), key=lambda n: table[n]["latency_ms"])
    best_float = min(table, key=lambda n: table[n]["latency_ms"])
    result.update({
        "latency_ms": latency,
        "latency_ms_spread": timed["engine"]["latency_ms_spread"],
        "fp32_engine": own,
        "fp32_latency_ms": table[own]["latency_ms"],
        "fp32_latency_ms_spread": table[own]["latency_ms_spread"],
        "speedup": table[own]["latency_ms"] / latency,
        "baselines": table,
        "best_fp32": best_fp32,
        "speedup_vs_best_fp32": table[best_fp32]["latency_ms"] / latency,
        "best_float": best_float,
        "speedup_vs_best_float": table[best_float]["latency_ms"] / latency,
        "engine_bytes": engine_bytes,
        "engine_resident_bytes": engine_rss,
        "fp32_resident_bytes": table[own]["resident_bytes"],
        "fp32_onnx_bytes": fp32_onnx_bytes,
        "fp32_engine_bytes": table[own]["engine_bytes"],
        "size_ratio": engine_bytes / fp32_onnx_bytes,
        "threads": threads,
        "warmup": warmup,
        "iterations": iterations,
        "batch": int(feeds["sample"].shape[0]),
        "sample_shape": list(feeds["sample"].shape),
    })
    return result


def open_engine(directory: Path, manifest: dict[str, Any], threads: int,
                 feeds: dict[str, np.ndarray]) -> tuple[Callable[[dict[str, np.ndarray]], Any], int]:
    """The built engine in ``directory`` as bench calls it (numpy feeds in, the backend's own
    runner; every group engine of a per-group engine), and the resident memory it added."""
    from quest_export.engine.backends import backend_of_manifest

    def open_call() -> Callable[[dict[str, np.ndarray]], Any]:
        runner = backend_of_manifest(manifest).open_runner(directory, manifest, threads)
        return lambda feeds: runner(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"])

    return opened_with_memory(open_call, feeds)


def bench_unet(bits: str, threads: int, warmup: int, iterations: int, log: Callable[[str], None] = print,
               profile: bool = False, backend: str = "onnxruntime", baselines: tuple[str, ...] = FLOAT_BASELINES) -> dict[str, Any]:
    """``--model bench-unet``: plain PTQ (one scale set) for ``backend``'s target on random inputs,
    export with parity check, that backend's engine, timed against every float baseline."""
    import torch

    from quest.recipe import load_recipe
    from quest_export import api
    from quest_export.engine.backends import get_backend
    from quest_export.export.manifest import layer_precision, quantized_layer_count
    from quest_export.models.bench_unet import BATCH, TOKENS, build_bench_unet, random_unet_inputs
    from quest_export.quantization import recipe_for_method

    engine_backend = get_backend(backend)
    engine_backend.require()
    started = time.perf_counter()
    recipe = recipe_for_method(load_recipe("bench-unet", bits), "ptq")
    calib = random_unet_inputs(8)

    def forward_loop(unet: torch.nn.Module) -> None:
        with torch.no_grad():
            for i in range(0, 8, 4):
                unet(calib[0][i : i + 4], calib[1][i : i + 4], encoder_hidden_states=calib[2][i : i + 4])

    log(f"bench-unet {bits} for {backend}: PTQ calibration ...")
    qunet = api.quantize_unet(build_bench_unet(), recipe, engine_backend.target, forward_loop)
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
        manifest = engine_backend.bench_build(path, engine_dir, threads)
        kernels = engine_backend.kernel_report(engine_dir, manifest, quantized_layer_count(layer_precision(exported.records, {})))
        log(f"timing {iterations} calls each after {warmup} warm-up calls ...")
        save_graph(exported.float_graph, Path(tmp) / "fp32.onnx")
        result = bench_against_baselines(open_engine(engine_dir, manifest, threads, feeds), engine_backend,
                                         engine_dir / manifest["model_file"], engine_backend.model_bytes(engine_dir, manifest),
                                         Path(tmp) / "fp32.onnx", feeds, threads, warmup, iterations, profile, baselines)
    result.update({"model": "bench-unet", "bits": bits, "backend": backend, "method": "ptq",
                   "parity_min_code_agreement": check["min_code_agreement"], "integer_kernels": kernels,
                   "total_seconds": round(time.perf_counter() - started, 1)})
    return result


TIMESTEP = 500.0  # the timestep of every row bench feeds an engine directory (one timestep group)


def bench_engine_dir(directory: Path, threads: int, warmup: int, iterations: int, profile: bool = False,
                     baselines: tuple[str, ...] = FLOAT_BASELINES) -> dict[str, Any]:
    """A CPU engine directory (onnxruntime or openvino) against the float engines of its source
    checkpoint's UNet."""
    import torch

    from quest_export.engine import groups
    from quest_export.engine.backends import BACKENDS, backend_of_manifest
    from quest_export.engine.manifest import read_engine_manifest
    from quest_export.engine.profiles import BuildProfile
    from quest_export.export import trace
    from quest_export.export.manifest import quantized_layer_count
    from quest_export.quantization import load_quantized

    manifest = read_engine_manifest(directory)
    engine_backend = backend_of_manifest(manifest)
    if engine_backend.device != "cpu":
        cpu = ", ".join(name for name, b in BACKENDS.items() if b.device == "cpu")
        raise UserError(f"bench times CPU engines ({cpu}); {directory} is a {engine_backend.name} engine: "
                        f"build one with `build-engine --backend {cpu.split(',')[0]}`")
    checkpoint = Path(manifest["source_checkpoint"]["path"])
    if not checkpoint.is_dir():
        raise UserError(f"the engine's source checkpoint {checkpoint} is gone; bench needs it to build the FP32 engine")
    _, qunet, _ = load_quantized(checkpoint)
    profile_ = BuildProfile.from_dict(manifest["profile"])
    config = manifest["unet_config"]
    generator = torch.Generator().manual_seed(3)
    batch, size, tokens = profile_.batch.opt, profile_.latent.opt, profile_.tokens.opt
    feeds = {
        "sample": torch.randn(batch, config["in_channels"], size, size, generator=generator).numpy(),
        "timestep": torch.full((batch,), TIMESTEP).numpy(),
        "encoder_hidden_states": torch.randn(batch, tokens, config["cross_attention_dim"], generator=generator).numpy(),
    }
    float_graph = trace.trace_float_graph(qunet, trace.example_inputs(qunet.unet, batch=batch, tokens=tokens))
    del qunet  # from here on only graphs on disk and the engines are held
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="quest-bench-fp32-") as tmp:
        save_graph(float_graph, Path(tmp) / "fp32.onnx")
        del float_graph
        piece_dir, piece = groups.piece_of_timestep(Path(directory), manifest, TIMESTEP)  # the engine the feeds run on
        result = bench_against_baselines(open_engine(Path(directory), manifest, threads, feeds), engine_backend,
                                         piece_dir / piece["model_file"], engine_backend.model_bytes(Path(directory), manifest),
                                         Path(tmp) / "fp32.onnx", feeds, threads, warmup, iterations, profile, baselines)
    result["integer_kernels"] = engine_backend.kernel_report(Path(directory), manifest, quantized_layer_count(manifest["layers"]))
    result.update({"engine": str(directory), "backend": manifest["backend"], "bits": manifest["source_checkpoint"].get("bits"),
                   "timestep": TIMESTEP, "group_engines": len(groups.pieces(Path(directory), manifest))})
    return result


def check_bench_request(engine: Path | None, model: str | None, bits: str, backend: str = "onnxruntime") -> None:
    """``bench`` times either a built engine or the built-in bench-unet at ``bits`` on a CPU backend."""
    from quest.recipe import parse_bits
    from quest_export.engine.backends import get_backend

    if get_backend(backend).device != "cpu":
        raise UserError(f"bench times CPU engines; --backend {backend} is not one (use onnxruntime or openvino)")

    if (engine is None) == (model is None):
        raise UserError("pass either --engine DIR or --model bench-unet")
    if model is not None and model != "bench-unet":
        raise UserError(f"--model {model!r}: bench builds only the built-in bench-unet; build other models with build-engine and pass --engine")
    if model is not None:
        parse_bits(bits)
