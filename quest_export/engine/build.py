"""``quest-export build-engine``: exported ONNX directory (or a checkpoint, exported first) ->
engine directory with ``manifest.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quest_export.artifacts import atomic_directory, seal_document, write_json_atomic
from quest_export.engine.backends import BACKENDS, Backend, get_backend
from quest_export.engine.groups import GROUPS_KEY, SINGLE_GRAPH, group_keys
from quest_export.engine.manifest import FORMAT, MANIFEST, file_entries
from quest_export.engine.profiles import BuildProfile, load_profile
from quest_export.errors import UserError


def read_export_manifest(directory: Path) -> dict[str, Any]:
    """An exported ONNX directory's manifest, the hash of every graph (one, or one per timestep
    group) checked."""
    from quest_export.artifacts import check_fields, sha256_file, verify_document

    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{directory} is not an exported ONNX directory (no readable manifest.json); run quest-export export") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "quest-export-onnx/1" or not isinstance(manifest.get("graphs"), dict):
        raise UserError(f"{path} is not a quest-export ONNX manifest; re-export the checkpoint")
    check_fields(manifest, {"target": str, "graphs": dict, "unet_config": dict, "timestep_grid": dict}, path, "re-export it")
    keys = group_keys(manifest["graphs"])
    check_fields(manifest, {"graphs": {key: {"file": str, "sha256": str} for key in keys}}, path, "re-export it")
    verify_document(manifest, path, "re-export the checkpoint (quest-export export --force)")
    for key in keys:
        graph = manifest["graphs"][key]
        file = Path(directory) / graph["file"]
        if not file.is_file() or sha256_file(file) != graph["sha256"]:
            raise UserError(f"{file} is missing or does not match its hash in manifest.json; re-export it")
        data = graph.get("data")
        if data is not None:  # the external weights of a graph past 2 GB
            data_path = Path(directory) / str(data.get("file", ""))
            if not data_path.is_file() or sha256_file(data_path) != data.get("sha256"):
                raise UserError(f"{data_path} (the graph's external weights) is missing or does not match its hash in manifest.json; re-export it")
    return manifest


KERNEL_CHECK_ROWS = 16  # rows fed to the kernel-level check (about 1 s on digits)
CROPPED_KERNEL_CHECK_ROWS = 4  # rows of 32x32 crops when the latents are larger (about 1 GB of tensors each on SD1.5)


@dataclass
class VerifyOptions:
    """How ``build-engine`` verifies the engine it built (engine/verify.py)."""

    enabled: bool = True
    calibration: Path | None = None  # calibration directory for the inputs [default: fresh FP trajectories]
    samples: int = 32  # sampling trajectories
    steps: int | None = None  # their step count [default: the calibration's]


def build_engine(source: Path, backend: str, out: Path, *, profile: str | Path = "digits", force: bool = False,
                 verify: VerifyOptions | None = None, timestep_scales: str = "table",
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the engine for ``backend`` from an export directory or a checkpoint (exported first,
    with ``timestep_scales``: one engine, or one per timestep group), then verify it against the
    simulation on this host (a failing engine is not written)."""
    from quest_export.export.exporter import check_timestep_scales

    check_timestep_scales(timestep_scales)
    engine_backend = get_backend(backend)
    verify = verify or VerifyOptions()
    build_profile = load_profile(profile)
    engine_backend.require()  # before any export work
    if out.exists() and not force:
        raise UserError(f"output directory {out} already exists; pass --force to replace it")
    source = Path(source)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quest-build-") as scratch:
        if (source / "quant.json").is_file():
            from quest_export.export.exporter import export_checkpoint

            log(f"exporting {source} for {backend} first ...")
            export_dir = Path(scratch) / "onnx"
            export_checkpoint(source, engine_backend.target, export_dir, timestep_scales=timestep_scales,
                              calibration=verify.calibration, log=log)
        elif (source / "manifest.json").is_file():
            export_dir = source
            if timestep_scales != "table":
                raise UserError(f"--timestep-scales applies when building from a checkpoint; {source} is an export, "
                                "whose form was chosen at export time (quest-export export --timestep-scales per-engine)")
        else:
            raise UserError(f"{source} is neither a quantized checkpoint nor an exported ONNX directory")
        export = read_export_manifest(export_dir)
        if export["target"] != engine_backend.target:
            fitting = [b.name for b in BACKENDS.values() if b.target == export["target"]]
            raise UserError(f"{source} was exported for target {export['target']!r}; build it with --backend {' or '.join(fitting)} "
                            f"or export the checkpoint with --target {engine_backend.target}")
        size = int(export["unet_config"]["sample_size"])
        if not build_profile.latent.contains(size):
            raise UserError(
                f"build profile {build_profile.name!r} covers latents {build_profile.latent.min}-{build_profile.latent.max}, "
                f"but the model exported in {source} has {size}x{size} latents; pass a profile whose latent range includes {size}"
            )
        checks = _verification_inputs(export_dir, export, build_profile, verify, log) if verify.enabled else None
        return _build_from_export(export_dir, export, engine_backend, build_profile, out, force, started, checks, log)


@dataclass
class _Checks:
    """A prepared verification set and what diagnosing a failure needs."""

    vset: Any
    reference: dict[str, Any]  # the exported graph of each key ("model", or "groupN"): onnx.ModelProto
    lookup: Any  # timestep -> group (torch.Tensor)


def _verification_inputs(export_dir: Path, export: dict[str, Any], profile: BuildProfile, options: VerifyOptions,
                         log: Callable[[str], None]) -> _Checks:
    """The simulation and the reference graph on the verification inputs (engine/verify.py)."""
    import onnx

    from quest_export.artifacts import sha256_file
    from quest_export.calibration_data import calibration_for_checks
    from quest_export.engine import groups, verify
    from quest_export.export.parity import ort_session
    from quest_export.pipelines.denoise import unet_fn
    from quest_export.quantization import load_quantized

    source = export["source_checkpoint"]
    checkpoint = Path(source["path"])
    if not (checkpoint / "quant.json").is_file():
        raise UserError(f"engine verification needs the export's source checkpoint {checkpoint}, which is gone; "
                        "restore it, build from the checkpoint itself, or pass --no-verify (the engine is then marked unverified)")
    if sha256_file(checkpoint / "quant.safetensors") != source["tensors_sha256"]:
        raise UserError(f"checkpoint {checkpoint} changed since {export_dir} was exported from it; re-export it")
    model, qunet, _ = load_quantized(checkpoint)
    calib = calibration_for_checks(model, qunet, options.calibration, trajectories=options.samples)
    keys = group_keys(export["graphs"])
    reference = {key: onnx.load(str(export_dir / export["graphs"][key]["file"])) for key in keys}
    fns = [verify.onnx_model_fn(ort_session(reference[key], optimize=False)) for key in keys]
    reference_fn = fns[0] if len(fns) == 1 else groups.grouped_fn(fns, qunet.context.lookup.cpu())
    from quest.calibration import samples_per_call

    batch = max(profile.batch.min, samples_per_call(min(profile.batch.max, 32), int(calib.x[0, 0].numel())))
    log("preparing engine verification: the simulation and the reference graph on the verification inputs ...")
    vset = verify.prepare(unet_fn(qunet.unet), reference_fn, calib,
                          qunet.context.lookup, model.pipeline.scheduler,
                          samples=options.samples, steps=options.steps, batch=batch)
    log(f"verification set: {len(vset.tensors['call_sample'])} rows covering every timestep group, "
        f"{len(vset.tensors['trajectory_noise'])} trajectories of {vset.steps} steps")
    return _Checks(vset, reference, qunet.context.lookup.cpu())


def _verify_built(tmp: Path, manifest: dict[str, Any], checks: _Checks, readable: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the engine in ``tmp`` exactly as EngineUNet runs it; refuse it (naming the layer) when it
    computes something else than the simulation.

    Two gates: the free-running bounds (engine/verify.py), and, where the engine graph is readable
    (ONNX Runtime), every integer kernel teacher-forced on the reference graph's values
    (engine/diagnose.py, about 1 s on digits): a kernel beyond rounding ties fails the build even
    when its error is too small to move the free-running figures past their bounds.
    """
    from quest_export.engine import diagnose, host, verify
    from quest_export.pipelines.denoise import unet_fn
    from quest_export.runtime.engine_unet import EngineUNet

    engine = EngineUNet.from_engine(tmp, verify="never")
    result = verify.check(unet_fn(engine), checks.vset)
    where = f"the {engine.backend} engine exposes no readable graph to locate the layer"
    if readable is not None:
        runners = getattr(engine.runner, "runners", [engine.runner])
        found = []
        for group, (key, runner) in enumerate(zip(checks.reference, runners)):
            sessions = engine.engine_backend.impl.piece_sessions(manifest, runner)
            feeds = _kernel_feeds(checks, None if key == SINGLE_GRAPH else group)
            checked = diagnose.check_kernels(readable[key], checks.reference[key], feeds, sessions)
            found += checked if key == SINGLE_GRAPH else [{**f, "layer": f"{f['layer']} ({key} engine)"} for f in checked]
        found = diagnose.worst_first(found)
        result["kernels"] = diagnose.summary(found)
        result["passed"] = result["passed"] and result["kernels"]["beyond_ties"] == 0
        where = diagnose.describe(found)
    kernels = result.get("kernels")
    log(f"engine verification on this host ({host.describe(manifest['device'])}): per-call error "
        f"{result['per_call_rel_error']:.3g} (bound {result['bounds']['per_call_rel_error']:.3g}), trajectory PSNR "
        f"{result['trajectory_psnr_db']:.1f} dB (bound {result['bounds']['trajectory_psnr_db']:.1f} dB; reference graph "
        f"{result['reference_graph']['per_call_rel_error']:.3g} / {result['reference_graph']['trajectory_psnr_db']:.1f} dB)"
        + (f", {kernels['checked'] - kernels['beyond_ties']} of {kernels['checked']} kernels match the reference" if kernels else "")
        + f": {'PASSED' if result['passed'] else 'FAILED'}")
    if result["passed"]:
        return result
    raise UserError(f"engine verification failed on this host ({host.describe(manifest['device'])}): "
                    f"{verify.failure_summary(result)}; {where}; the engine computes something other than the "
                    "simulation, so nothing was written")


def _kernel_feeds(checks: _Checks, group: int | None = None) -> dict[str, Any]:
    """Verification rows spread over every timestep group (they are stored group by group) as
    graph inputs for the kernel check: a kernel wrong in one group's scales is seen too. ``group``:
    only that group's rows (a per-group engine's graph is checked on its own group)."""
    import numpy as np
    import torch

    from quest.calibration import FULL_BATCH_TOKENS
    from quest.timesteps import groups_for
    from quest_export.engine import verify

    tensors = checks.vset.tensors
    if group is not None:
        keep = groups_for(checks.lookup, tensors["call_timestep"]) == group
        tensors = {k: tensors[k][keep] for k in verify.CALL_KEYS[:3]}
    total = len(tensors["call_sample"])
    sample = tensors["call_sample"]
    side, rows = int(FULL_BATCH_TOKENS**0.5), KERNEL_CHECK_ROWS
    if sample[0, 0].numel() > FULL_BATCH_TOKENS:
        # every intermediate tensor of the reference graph is held for this check: on 64x64 latents
        # that is ~10 GB per row, so it runs on centre crops at 32x32 (the same kernels, weights
        # and scales; the engine itself is verified at full size, free-running, above)
        top, left = (sample.shape[2] - side) // 2, (sample.shape[3] - side) // 2
        sample, rows = sample[:, :, top : top + side, left : left + side], CROPPED_KERNEL_CHECK_ROWS
    pick = torch.linspace(0, total - 1, min(total, rows)).round().long()
    timestep, states = (tensors[k][pick].numpy() for k in verify.CALL_KEYS[1:3])
    return {"sample": np.ascontiguousarray(sample[pick].numpy()), "timestep": timestep, "encoder_hidden_states": states}


def _build_from_export(export_dir: Path, export: dict[str, Any], backend: Backend, profile: BuildProfile, out: Path,
                       force: bool, started: float, checks: _Checks | None, log: Callable[[str], None]) -> dict[str, Any]:
    from quest_export.engine.host import runtime_fingerprint

    config = export["unet_config"]
    keys = group_keys(export["graphs"])
    with atomic_directory(out, force=force) as tmp:
        if keys == [SINGLE_GRAPH]:
            fields, readable_graph = backend.build(export_dir / export["graphs"][SINGLE_GRAPH]["file"], tmp, profile, config)
            readable = None if readable_graph is None else {SINGLE_GRAPH: readable_graph}
        else:
            fields, readable = _build_groups(export_dir, export, keys, backend, profile, tmp, log)
        for extra in ("parity.json",):
            if (export_dir / extra).is_file():
                shutil.copy(export_dir / extra, tmp / extra)
        verification = None
        if checks is not None:
            verification = {**checks.vset.save(tmp), "host": fields["device"],
                            "fingerprint": runtime_fingerprint(fields["device"], fields["backend_version"],
                                                               fields.get("provider", backend.name))}
        manifest = {
            "format": FORMAT,
            "backend": backend.name,
            **fields,
            "profile": profile.to_dict(),
            "inputs": export["inputs"],
            "unet_config": config,
            "target": export["target"],
            "opset": export["opset"],
            "graph_precision": export["graph_precision"],
            "timestep_grid": export["timestep_grid"],
            "layers": export["layers"],
            "source_checkpoint": export["source_checkpoint"],
            "source_export": {"graph_sha256": export["graphs"][keys[0]]["sha256"],
                              "graph_sha256s": {key: export["graphs"][key]["sha256"] for key in keys},
                              "timestep_scales": export.get("timestep_scales", "table"), "fp32_onnx_bytes": export["fp32_onnx_bytes"],
                              "quantized_onnx_bytes": export["quantized_onnx_bytes"], "parity_passed": export.get("parity_passed")},
            "verification": verification,
            "files": file_entries(tmp, sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())),
        }
        write_json_atomic(tmp / MANIFEST, seal_document(manifest))
        if checks is not None:
            manifest["verification"]["result"] = _verify_built(tmp, manifest, checks, readable, log)
        manifest["build_seconds"] = round(time.perf_counter() - started, 2)
        write_json_atomic(tmp / MANIFEST, seal_document(manifest))
    return manifest


def _build_groups(export_dir: Path, export: dict[str, Any], keys: list[str], backend: Backend, profile: BuildProfile,
                  tmp: Path, log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One backend engine per timestep group, each in its own sub-directory of ``tmp``
    (engine/groups.py). Returns the manifest fields (the first group's backend fields, and every
    group's under ``engine_groups``) and each group's readable engine graph (None when the backend
    has none)."""
    entries: dict[str, dict[str, Any]] = {}
    readable: dict[str, Any] = {}
    for key in keys:
        log(f"building the {key} engine ({keys.index(key) + 1} of {len(keys)}) ...")
        (tmp / key).mkdir()
        fields, graph = backend.build(export_dir / export["graphs"][key]["file"], tmp / key, profile, export["unet_config"])
        entries[key] = {"directory": key, **fields}
        readable[key] = graph
    shared = {k: v for k, v in entries[keys[0]].items() if k not in ("directory", "model_file")}
    return {**shared, GROUPS_KEY: entries}, (readable if all(g is not None for g in readable.values()) else None)
