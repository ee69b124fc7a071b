"""``quest-export export``: quantized checkpoint -> Q/DQ ONNX graph(s) + manifest + parity report.

trace (markers) -> Q/DQ + timestep tables -> constant folding -> [FP16 for TensorRT] -> lint ->
parity against the simulation -> files written into a temporary directory renamed into place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from quest_export.artifacts import atomic_directory, seal_document, write_json_atomic
from quest_export.onnx_io import is_large, save_graph, serialized_bytes  # noqa: F401 - save_graph: callers import it from here
from quest_export.errors import UserError
from quest_export.export import lint, parity, passes, qdq, trace
from quest_export.export.manifest import build_manifest

OPSET = 21
TIMESTEP_SCALES = ("table", "per-engine")
FP16_CODE_AGREEMENT = 0.97  # documented FP16 bound (README "Export"): FP16 rounding of activations and softmax
# probabilities before Q moves up to ~2.5% of codes by one step (the strict check runs on the FP32 Q/DQ graph)
FP16_ERROR_BOUND = 2e-2  # teacher-forced max abs error of the noise prediction, FP16 graph
GRAPH_FILE = "model.onnx"


@dataclass
class ExportResult:
    out: Path
    manifest: dict[str, Any]
    parity: dict[str, Any] | None


def check_timestep_scales(timestep_scales: str) -> None:
    """``--timestep-scales``: one of :data:`TIMESTEP_SCALES`, else one line naming them."""
    if timestep_scales not in TIMESTEP_SCALES:
        raise UserError(f"unknown --timestep-scales {timestep_scales!r}; choose one of: {', '.join(TIMESTEP_SCALES)}")


def check_target(checkpoint_target: str, target: str) -> None:
    """A checkpoint runs only on the arithmetic it was finetuned for: refuse, never convert."""
    from quest.profiles import PROFILES

    if target not in PROFILES:
        raise UserError(f"unknown --target {target!r}; choose one of: {', '.join(PROFILES)}")
    if checkpoint_target != target:
        raise UserError(
            f"the checkpoint was made for target {checkpoint_target!r}, whose integer arithmetic differs from {target!r}; "
            f"export it with --target {checkpoint_target} or re-run finetune with --target {target}"
        )


def parity_inputs(qunet, model, calibration: Path | None) -> parity.ParityInputs:
    """Calibration rows covering every timestep group: from ``--calibration`` or two fresh FP trajectories."""
    from quest_export.calibration_data import calibration_for_checks

    calib = calibration_for_checks(model, qunet, calibration)
    x, t, cond = calib.unet_inputs(torch.arange(len(calib)))
    return parity.inputs_covering_groups(x, t.float(), cond, qunet.context.lookup)


@contextmanager
def _scales_of_group(qunet, group: int | None) -> Iterator[None]:
    """Collapse every scale table to one group's entry (``--timestep-scales per-engine``) for the
    duration of the block, then put the tables back: one loaded model serves every group.

    The entry is the scale the table graph applies (``graph_table``). An FP16 graph stores it as
    one FP16 number, so a tensorrt per-engine graph quantizes with a scale up to 2^-11 of itself
    away from what finetuning simulated (the table form holds it exactly); parity checks the graph
    against the simulation with that entry."""
    if group is None:
        yield
        return
    saved = []
    for _, module in qunet.activation_quantizers():
        if hasattr(module, "scale") and module.scale.numel() > 1:
            saved.append((module, module.scale.data))
            module.scale.data = module.graph_table().detach()[group : group + 1].clone()
    try:
        yield
    finally:
        for module, table in saved:
            module.scale.data = table


@dataclass
class GraphSet:
    """The graphs of one export in memory (``model`` or ``groupN`` -> the graph that ships), the
    quantized tensors they hold and the parity report of each against the simulation."""

    graphs: dict[str, onnx.ModelProto]
    records: list[qdq.QuantizedTensor]
    reports: dict[str, Any]
    float_graph: onnx.ModelProto | None  # the same UNet without Q/DQ: the FP32 baseline engines are built from it
    float_graph_bytes: int = 0  # its serialised size (kept when the graph itself is not)


def export_graphs(qunet, example: trace.ExampleInputs, inputs: parity.ParityInputs | None, *,
                  timestep_scales: str = "table", check_optimized: bool | None = None,
                  log: Callable[[str], None] = print, keep_float_graph: bool = True) -> GraphSet:
    """trace -> Q/DQ + timestep tables -> fold -> [FP16] -> lint -> parity, for a quantized UNet in
    memory. ``inputs`` None skips parity; ``check_optimized`` defaults to the profile's own rule.
    ``keep_float_graph`` False keeps only the FP32 graph's size (3.4 GB less held for SD1.5)."""
    check_timestep_scales(timestep_scales)
    profile = qunet.profile
    lookup = qunet.context.lookup.cpu().numpy()
    optimized = profile.fused_kernel_checks if check_optimized is None else check_optimized
    groups = [None] if timestep_scales == "table" else list(range(int(lookup.max()) + 1))
    result = GraphSet({}, [], {}, None)
    for group in groups:
        key = "model" if group is None else f"group{group}"
        with _scales_of_group(qunet, group):
            marked, quantizers = trace.trace_marked_graph(qunet, example)
            if not result.float_graph_bytes:
                # kept (bench builds the float engines from it): traced as a float engine would be;
                # only its size kept: the quantized trace without markers is as large
                float_graph = trace.trace_float_graph(qunet, example, marked) if keep_float_graph else passes.strip_markers(marked)
                result.float_graph_bytes = serialized_bytes(float_graph)
                result.float_graph = float_graph if keep_float_graph else None
                del float_graph
            graph_lookup = lookup if group is None else np.zeros_like(lookup)
            graph, records = qdq.insert_qdq(marked, quantizers, profile, graph_lookup, OPSET)
            del marked  # the traced FP32 graph: as large as the model
            fp32_graph = graph = passes.fold_constants(graph)
            if profile.graph_precision == "fp16":
                graph = passes.to_fp16(graph)
            problems = lint.lint(graph, profile.graph_rules)
            if problems:
                raise UserError(f"the exported graph breaks {profile.graph_rules}'s quantization rules: {problems[0]} "
                                f"({len(problems)} problem(s)); the checkpoint cannot be expressed on {profile.name}")
            onnx.checker.check_model(graph, full_check=False) if not is_large(graph) else None
            result.graphs[key] = graph
            result.records = records
            if inputs is not None:
                rows = inputs if group is None else _rows_of_group(inputs, lookup, group)
                log(f"verifying {key} against the simulation on {rows.sample.shape[0]} inputs ...")
                # an FP16 graph is held to the FP16 bound and its FP32 twin to the strict one; the twin
                # is dropped once checked (1 GB for SD1.5 that the FP16 check need not hold)
                strict = parity.check_parity(fp32_graph, records, qunet, rows, check_optimized=optimized).to_dict()
                shipped_is_twin = graph is fp32_graph
                del fp32_graph
                result.reports[key] = strict if shipped_is_twin else _fp16_parity_entry(graph, strict, records, qunet, rows)
            else:
                del fp32_graph
    return result


def _fp16_parity_entry(graph: onnx.ModelProto, strict: dict[str, Any], records, qunet, rows: parity.ParityInputs) -> dict[str, Any]:
    """The FP16 graph's parity, with its FP32 twin's strict result; both must pass."""
    shipped = parity.check_parity(graph, records, qunet, rows, code_threshold=FP16_CODE_AGREEMENT,
                                  error_bound=FP16_ERROR_BOUND, graph_precision="fp16", check_optimized=False)
    entry = {**shipped.to_dict(), "fp32_qdq_graph": strict}
    entry["passed"] = shipped.passed and strict["passed"]  # the FP32 twin is held to the strict check
    return entry


def linear_kernel_count(records: list[qdq.QuantizedTensor]) -> int:
    """How many ops consume a quantized activation: the convolutions/matmuls that could run in integer."""
    return len({c for r in records if r.kind == "activation" for c in r.consumers})


def export_checkpoint(checkpoint: Path, target: str, out: Path, *, timestep_scales: str = "table", verify: bool = True,
                      calibration: Path | None = None, force: bool = False,
                      log: Callable[[str], None] = print) -> ExportResult:
    """``quest-export export``: load the checkpoint once, export its graphs, write them with the
    manifest and parity report into ``out`` atomically (nothing is left when parity fails)."""
    from quest_export.quantization import load_quantized

    check_timestep_scales(timestep_scales)
    started = time.perf_counter()
    model, qunet, meta = load_quantized(Path(checkpoint))
    check_target(meta["target"], target)
    profile = qunet.profile
    if out.exists() and not force:
        raise UserError(f"output directory {out} already exists; pass --force to replace it")
    lookup = qunet.context.lookup.cpu().numpy()
    inputs = parity_inputs(qunet, model, calibration) if verify else None
    tokens = int(inputs.encoder_hidden_states.shape[1]) if inputs is not None else None
    example = trace.example_inputs(qunet.unet, tokens=tokens or _default_tokens(model))
    exported = export_graphs(qunet, example, inputs, timestep_scales=timestep_scales, log=log, keep_float_graph=False)

    with atomic_directory(out, force=force) as tmp:
        graph_files: dict[str, Path] = {}
        for key, graph in exported.graphs.items():
            path = tmp / (GRAPH_FILE if key == "model" else f"model.{key}.onnx")
            save_graph(graph, path)
            graph_files[key] = path
        parity_doc = _parity_document(exported.reports) if exported.reports else None
        if parity_doc is not None:
            write_json_atomic(tmp / "parity.json", parity_doc)
        kernel_report = None
        if profile.fused_kernel_checks and "model" in graph_files:
            from quest_export.export.kernels import integer_kernel_report

            kernel_report = integer_kernel_report(graph_files["model"], linear_kernel_count(exported.records))
        seconds = round(time.perf_counter() - started, 2)
        quant_bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith("model."))
        manifest = build_manifest(
            checkpoint_dir=Path(checkpoint), checkpoint_meta=meta, target=target, opset=OPSET, graph_files=graph_files,
            records=exported.records, lookup=lookup, timestep_scales=timestep_scales, graph_precision=profile.graph_precision,
            inputs={"sample": ["batch", int(example.sample.shape[1]), "height", "width"], "timestep": ["batch"],
                    "encoder_hidden_states": ["batch", "tokens", int(example.encoder_hidden_states.shape[2])],
                    "trace_size": list(example.sample.shape[2:]), "trace_tokens": int(example.encoder_hidden_states.shape[1])},
            extra={"export_seconds": seconds, "fp32_onnx_bytes": exported.float_graph_bytes, "quantized_onnx_bytes": quant_bytes,
                   "ort_integer_kernels": kernel_report, "parity_passed": None if parity_doc is None else parity_doc["passed"], "verified": parity_doc is not None},
        )
        manifest["unet_config"] = unet_config_dict(qunet.unet)
        write_json_atomic(tmp / "manifest.json", seal_document(manifest))
        if parity_doc is not None and not parity_doc["passed"]:
            failing = parity_doc
            raise UserError(
                f"parity check failed: min code agreement {failing['min_code_agreement']:.5f} (needs {failing['code_threshold']}), "
                f"max abs error {failing['max_abs_error']:.2e} (bound {failing['error_bound']:.0e}), differing codes all "
                f"rounding ties: {'yes' if failing['code_differences_are_ties'] else 'no'}"
                f"{_twin_failure(failing)}"
                "; the export does not compute "
                "what the simulation computes - this is a bug, please report it (nothing was written)"
            )
    return ExportResult(out, manifest, parity_doc)


def unet_config_dict(unet) -> dict[str, Any]:
    """The diffusers UNet config as plain JSON (what EngineUNet exposes as ``.config``)."""
    import json

    return json.loads(json.dumps({k: v for k, v in dict(unet.config).items() if not k.startswith("_")}, default=list))


def _default_tokens(model) -> int:
    return model.traits.trace_tokens


def _rows_of_group(inputs: parity.ParityInputs, lookup: np.ndarray, group: int) -> parity.ParityInputs:
    from quest.timesteps import groups_for

    groups = groups_for(torch.from_numpy(lookup), inputs.timestep)
    keep = groups == group
    return parity.ParityInputs(inputs.sample[keep], inputs.timestep[keep], inputs.encoder_hidden_states[keep])


def _twin_failure(document: dict[str, Any]) -> str:
    """The strict FP32 twin's figures, when it is what failed."""
    for graph in document["graphs"].values():
        twin = graph.get("fp32_qdq_graph")
        if twin and not twin["passed"]:
            return (f"; its FP32 Q/DQ twin: min code agreement {twin['min_code_agreement']:.5f}, "
                    f"max abs error {twin['max_abs_error']:.2e}, ties only: {'yes' if twin['code_differences_are_ties'] else 'no'}")
    return ""


def _parity_document(reports: dict[str, Any]) -> dict[str, Any]:
    """One ``parity.json``: the top-level fields summarise the worst graph."""
    worst = min(reports.values(), key=lambda r: r["min_code_agreement"])
    return {
        "passed": all(r["passed"] for r in reports.values()),
        "min_code_agreement": min(r["min_code_agreement"] for r in reports.values()),
        "max_abs_error": max(r["max_abs_error"] for r in reports.values()),
        "code_differences_are_ties": all(r["code_differences_are_ties"] and r.get("fp32_qdq_graph", r)["code_differences_are_ties"]
                                         for r in reports.values()),
        "code_threshold": worst["code_threshold"],
        "error_bound": worst["error_bound"],
        "graph_precision": worst["graph_precision"],
        "tensors": worst["tensors"] if len(reports) == 1 else [t for r in reports.values() for t in r["tensors"]],
        "graphs": {k: {kk: vv for kk, vv in v.items() if kk != "tensors"} for k, v in reports.items()},
    }
