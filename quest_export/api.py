"""The library API: quantize -> export -> build as three calls on objects, in the style of ModelOpt's
``mtq.quantize(model, config, forward_loop)`` and diffusers' ``save_pretrained``/``from_pretrained``.

    from quest_export import api
    from quest_export.runtime import EngineUNet

    qmodel = api.quantize("digits", bits="w4a8", method="ptq-timestep", target="onnxruntime",
                          calibration="out/calib")
    exported = api.export(qmodel)                          # parity vs the simulation attached
    engine = api.build(exported, backend="onnxruntime")    # verified on this host
    engine.save("out/engine")
    pipe.unet = EngineUNet.from_pretrained("out/engine")

A UNet of your own, in memory (no model registry, no checkpoint): ``quantize_unet(unet, recipe,
target, forward_loop)`` then ``export_unet(qunet, parity_inputs)``; ``bench --model bench-unet`` is
built on these two.

Every stage runs the same code as the CLI command of the same name (the CLI is parse -> one of
these -> print). Provenance is kept as on disk: an export records the checkpoint it was made from
(by hash), so ``export`` saves an unsaved model into a scratch checkpoint owned by the objects, and
``build`` verifies against it; ``save``/``save_pretrained`` write the real artifacts atomically.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quest_export.errors import UserError


@dataclass
class QuantizedModel:
    """A quantized (simulated) UNet inside its FP pipeline, with what made it."""

    model: Any  # quest_export.models.resolve.LoadedModel; its pipeline's unet is the quantized one
    qunet: Any  # quest.quantize.QuantizedUNet
    meta: dict[str, Any]
    calibration: Any  # quest.calibration.CalibrationSet
    path: Path | None = None  # where it was saved (None: in memory only)
    _scratch: Any = field(default=None, repr=False)

    @property
    def unet(self) -> Any:
        return self.qunet.unet

    def save_pretrained(self, directory: str | Path, force: bool = False) -> Path:
        """Write the checkpoint directory (quant.safetensors, quant.json, calibration) atomically."""
        from quest_export.finetune_job import write_checkpoint

        directory = Path(directory)
        if directory.exists() and not force:
            raise UserError(f"{directory} already exists; pass force=True to replace it")
        write_checkpoint(directory, self.qunet, self.meta, self.calibration, force=force)
        self.path = directory
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "QuantizedModel":
        """Load a checkpoint (from ``save_pretrained`` or ``quest-export finetune``)."""
        from quest_export.calibration_data import calibration_for_checks
        from quest_export.quantization import load_quantized

        directory = Path(directory)
        model, qunet, meta = load_quantized(directory)
        calib = calibration_for_checks(model, qunet, directory if (directory / "calibration.json").is_file() else None)
        return cls(model, qunet, meta, calib, directory)

    def _saved(self) -> Path:
        """The checkpoint directory, saving into a scratch one when the model was never saved."""
        if self.path is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="quest-api-checkpoint-")
            self.save_pretrained(Path(self._scratch.name) / "checkpoint", force=True)
        return self.path


def quantize(model: str, bits: str = "w8a8", *, method: str = "quest", target: str | None = None,
             recipe: str | Path | None = None, calibration: str | Path | None = None) -> QuantizedModel:
    """Quantize ``model`` (a ``--model`` value) with ``method`` on the recipe for ``bits``;
    ``calibration`` is a calibration directory (default: recorded from the FP model)."""
    from quest.distributed import DistContext
    from quest_export.finetune_job import FinetuneRequest, model_and_calibration, plan
    from quest_export.quantization import FinetuneRun, checkpoint_meta, quantize_with_method

    calibration = Path(calibration) if calibration is not None else None
    request = FinetuneRequest(Path(tempfile.gettempdir()) / "quest-api", model, bits, method, Path(recipe) if recipe else None,
                              target, calibration)
    qrecipe, profile = plan(request)
    loaded, calib, calib_seconds = model_and_calibration(model, qrecipe, profile, calibration)
    with tempfile.TemporaryDirectory(prefix="quest-api-state-") as scratch:
        run = FinetuneRun(state_path=Path(scratch) / "state.safetensors", resume=False, dist=DistContext())
        qunet, report = quantize_with_method(loaded, qrecipe, method, calib, run)
    report.pop("log", None)
    options = report.pop("options", {})
    meta = checkpoint_meta(loaded, method, calib, {"timings": {"calibration_seconds": round(calib_seconds, 2), **report},
                                                   "world_size": 1, "options": options})
    return QuantizedModel(loaded, qunet, meta, calib)


def quantize_unet(unet: Any, recipe: Any, target: str | None = None, forward_loop: Any = None) -> Any:
    """ModelOpt's ``mtq.quantize(model, config, forward_loop)`` for a UNet in memory (any diffusers
    ``UNet2DConditionModel``): ``recipe`` (a :class:`quest.recipe.Recipe`) on ``target``'s arithmetic
    (default: the recipe's), quantizers initialised by PTQ over the calls ``forward_loop(unet)``
    makes. Returns the :class:`quest.quantize.QuantizedUNet`; the UNet is quantized in place."""
    from quest.profiles import get_profile
    from quest.ptq import calibrate
    from quest.quantize import quantize_unet as apply_recipe

    qunet = apply_recipe(unet, recipe, get_profile(target or recipe.target))
    if forward_loop is not None:
        calibrate(qunet, forward_loop)
    return qunet


def export_unet(qunet: Any, parity_inputs: tuple[Any, Any, Any] | None, *, batch: int = 2, tokens: int | None = None,
                check_optimized: bool | None = None) -> Any:
    """The Q/DQ graph of an in-memory quantized UNet (``export.exporter.GraphSet``: ``graphs["model"]``,
    ``reports["model"]`` the parity check on ``parity_inputs`` = (sample, timestep, states),
    ``float_graph`` for an FP32 baseline). Nothing is written; there is no checkpoint to record."""
    from quest_export.export import parity, trace
    from quest_export.export.exporter import export_graphs

    tokens = tokens or (int(parity_inputs[2].shape[1]) if parity_inputs is not None else None)
    example = trace.example_inputs(qunet.unet, batch=batch, tokens=tokens)
    inputs = parity.ParityInputs(*parity_inputs) if parity_inputs is not None else None
    return export_graphs(qunet, example, inputs, check_optimized=check_optimized, log=lambda _: None)


@dataclass
class _Directory:
    """An artifact directory built in scratch space; ``save`` copies it out atomically."""

    directory: Path
    manifest: dict[str, Any]

    def save(self, out: str | Path, force: bool = False) -> Path:
        from quest_export.artifacts import atomic_directory

        out = Path(out)
        if out.exists() and not force:
            raise UserError(f"{out} already exists; pass force=True to replace it")
        with atomic_directory(out, force=force) as tmp:
            for item in self.directory.iterdir():  # a per-group engine keeps each group's engine in a sub-directory
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        return out


@dataclass
class ExportedGraph(_Directory):
    """The Q/DQ ONNX graph(s) and manifest; ``parity`` is the check against the simulation."""

    parity: dict[str, Any] | None = None
    source: QuantizedModel | None = None
    _scratch: Any = field(default=None, repr=False)


def export(qmodel: QuantizedModel, target: str | None = None, *, timestep_scales: str = "table",
           verify: bool = True) -> ExportedGraph:
    """Export to the model's own target (``quest-export export``), parity-checked on its calibration rows."""
    from quest_export.export.exporter import export_checkpoint

    checkpoint = qmodel._saved()
    scratch = tempfile.TemporaryDirectory(prefix="quest-api-export-")
    out = Path(scratch.name) / "onnx"
    calib_dir = checkpoint if (checkpoint / "calibration.json").is_file() else None
    result = export_checkpoint(checkpoint, target or qmodel.qunet.profile.name, out, timestep_scales=timestep_scales,
                               verify=verify, calibration=calib_dir, log=lambda _: None)
    return ExportedGraph(out, result.manifest, result.parity, qmodel, scratch)


@dataclass
class Engine(_Directory):
    """A built, verified engine; ``unet()`` opens it as a drop-in ``pipe.unet``."""

    _scratch: Any = field(default=None, repr=False)

    def unet(self) -> Any:
        from quest_export.runtime.engine_unet import EngineUNet

        return EngineUNet.from_engine(self.directory, verify="never")  # verified when built, on this host


def build(exported: ExportedGraph, backend: str = "onnxruntime", build_profile: str | Path = "digits", *,
          verify: bool = True, verify_samples: int = 32) -> Engine:
    """Build and verify the engine (``quest-export build-engine``); a wrong engine raises UserError."""
    from quest_export.engine.build import VerifyOptions, build_engine

    checkpoint = Path(exported.manifest["source_checkpoint"]["path"])
    calib_dir = checkpoint if (checkpoint / "calibration.json").is_file() else None
    scratch = tempfile.TemporaryDirectory(prefix="quest-api-engine-")
    out = Path(scratch.name) / "engine"
    manifest = build_engine(exported.directory, backend, out, profile=build_profile,
                            verify=VerifyOptions(enabled=verify, calibration=calib_dir, samples=verify_samples), log=lambda _: None)
    return Engine(out, manifest, scratch)
