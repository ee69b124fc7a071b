"""Engine-level verification: the built engine, run exactly as ``EngineUNet`` runs it, against the
PyTorch simulation it was finetuned as.

The export's parity check proves the *reference graph* (ONNX Runtime with graph optimizations off,
Q/DQ evaluated in float) computes the simulation's integer codes, teacher-forced layer by layer.
The engine is another program: fused integer kernels chosen by the host CPU (MLAS, oneDNN,
TensorRT tactics). Fused kernels cannot be teacher-forced, so the engine is judged free-running, by
how far it strays from the simulation compared with how far the verified reference graph strays:

* **per call**, on ``ROWS_PER_GROUP`` rows from every timestep group: the median over rows of the
  relative L2 error of each row's noise prediction vs the simulation may be at most
  ``PER_CALL_FACTOR`` times the reference graph's own (both differ from the simulation only by float
  round-off that flips rounding ties, which then propagate; an engine whose kernels compute other
  integers is an order of magnitude off on every row, measured 12x on an AVX2-only host with 8-bit
  weights), and at least the reference's error pooled over all rows (where most rows of the
  reference have no flip at all, its median is 0 while a single flip in an engine row moves that
  row by 1e-2; measured on a W4A4 test engine), with a floor of ``PER_CALL_FLOOR``. The median, because tie
  flips propagate chaotically in a few rows (measured: one t=0 row at 0.085 for the engine and 0.002
  for the reference, the next row the other way round), so an error pooled over few rows is decided
  by one row; a systematic error moves every row. Kernel-level faults too small or too local for
  these figures are the build's kernel check (engine/diagnose.py);
* **along a sampling trajectory** (the deployment scheduler and guidance, from seeded noise): the
  mean per-sample PSNR of the final latents vs the simulation's must reach ``TRAJECTORY_PSNR_DB``,
  or come within ``TRAJECTORY_MARGIN_DB`` of the reference graph's own PSNR where that is lower:
  with 4-bit activations each tie flip moves a code by 1/16 of its range, so even the verified
  reference stays near 32 dB on digits W4A4 - that distance is round-off a correct engine shares,
  not error (measured: a correct engine lands within 1 dB of its reference, the AVX2-saturating
  one 20 dB below it).

The inputs, the simulation's outputs and the bounds are stored in the engine directory
(``verification.safetensors`` + the manifest's ``verification`` section), so a host of another
kernel class re-runs the same check before its first call without the checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from quest_export.errors import UserError
from quest_export.evaluation.evaluate import PSNR_CAP_DB
from quest_export.evaluation.image_metrics import psnr
from quest_export.pipelines.denoise import ModelFn, denoise

VERIFY_FILE = "verification.safetensors"
PER_CALL_FACTOR = 2.0
PER_CALL_FLOOR = 1e-3
TRAJECTORY_PSNR_DB = 40.0
TRAJECTORY_MARGIN_DB = 3.0
ROWS_PER_GROUP = 8
CALL_KEYS = ("call_sample", "call_timestep", "call_states", "call_expected")
TRAJECTORY_KEYS = ("trajectory_noise", "trajectory_states", "trajectory_expected")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


def row_relative_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Relative L2 error of every row (sample) separately."""
    diff = (got.float() - want.float()).flatten(1).norm(dim=1)
    return diff / want.float().flatten(1).norm(dim=1).clamp_min(1e-12)


def trajectory_psnr(got: torch.Tensor, want: torch.Tensor) -> float:
    """Mean per-sample PSNR (dB, capped as ``eval`` caps it) over the range of the expected latents
    (for digits, latents are pixels in [-1, 1]: the same figure as ``eval``'s psnr on [0, 1] images)."""
    data_range = float(want.max() - want.min()) or 1.0
    return float(psnr(got, want, data_range).clamp(max=PSNR_CAP_DB).mean())


def scheduler_from_spec(spec: dict[str, Any]) -> Any:
    import diffusers

    cls = getattr(diffusers, spec["class"], None)
    if cls is None:
        raise UserError(f"the engine's verification scheduler {spec['class']!r} is not in this diffusers; rebuild the engine")
    return cls.from_config(spec["config"])


@dataclass
class VerificationSet:
    """What the engine is checked on, and what it must compute."""

    tensors: dict[str, torch.Tensor]
    scheduler: dict[str, Any]  # {"class": diffusers class name, "config": its config}
    steps: int
    guidance: float
    bounds: dict[str, float]  # per_call_rel_error, trajectory_psnr_db
    reference: dict[str, float]  # the reference graph's own figures the bounds derive from

    batch: int = 8  # most rows per model call (the engine's build profile caps it)

    def run(self, model: ModelFn) -> dict[str, float]:
        """The figures of ``model`` on this set: per-call error and trajectory PSNR vs the simulation."""
        t = self.tensors
        with torch.no_grad():
            out = torch.cat([model(t["call_sample"][i : i + self.batch], t["call_timestep"][i : i + self.batch],
                                   t["call_states"][i : i + self.batch]) for i in range(0, len(t["call_sample"]), self.batch)])
            final = self._trajectories(model)
        return {"per_call_rel_error": float(row_relative_errors(out, t["call_expected"]).median()),
                "per_call_pooled_rel_error": relative_error(out, t["call_expected"]),
                "per_call_max_abs_error": float((out.float() - t["call_expected"]).abs().max()),
                "trajectory_psnr_db": trajectory_psnr(final, t["trajectory_expected"])}

    def _trajectories(self, model: ModelFn) -> torch.Tensor:
        """Final latents of every trajectory, a few samples per batch ([uncond; cond] when guided)."""
        noise, states = self.tensors["trajectory_noise"], self.tensors["trajectory_states"]
        guided = self.guidance > 1.0
        n = len(noise)
        per = max(1, self.batch // 2 if guided else self.batch)
        finals = []
        for i in range(0, n, per):
            rows = torch.arange(i, min(i + per, n))
            chunk_states = torch.cat([states[rows], states[rows + n]]) if guided else states[rows]
            finals.append(denoise(model, scheduler_from_spec(self.scheduler), noise[rows], chunk_states, self.guidance, self.steps))
        return torch.cat(finals)

    def judge(self, figures: dict[str, float]) -> bool:
        return (figures["per_call_rel_error"] <= self.bounds["per_call_rel_error"]
                and figures["trajectory_psnr_db"] >= self.bounds["trajectory_psnr_db"])

    def save(self, directory: Path) -> dict[str, Any]:
        """Write the tensors; returns the manifest section that describes them."""
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(Path(directory) / VERIFY_FILE))
        return {"file": VERIFY_FILE, "scheduler": self.scheduler, "steps": self.steps, "guidance": self.guidance, "batch": self.batch,
                "bounds": self.bounds, "reference_graph": self.reference,
                "call_rows": int(self.tensors["call_sample"].shape[0]),
                "trajectory_samples": int(self.tensors["trajectory_noise"].shape[0]),
                "call_timesteps": sorted({int(v) for v in self.tensors["call_timestep"].round().tolist()})}

    @classmethod
    def load(cls, directory: Path, section: dict[str, Any]) -> "VerificationSet":
        path = Path(directory) / section["file"]
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise UserError(f"cannot read {path} ({type(exc).__name__}); rebuild the engine") from None
        missing = [k for k in CALL_KEYS + TRAJECTORY_KEYS if k not in tensors]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}; rebuild the engine")
        return cls(tensors, section["scheduler"], int(section["steps"]), float(section["guidance"]),
                   dict(section["bounds"]), dict(section.get("reference_graph", {})), int(section.get("batch", 8)))


def bounds_for(reference: dict[str, float]) -> dict[str, float]:
    """The engine's bounds from the reference graph's own figures (module docstring)."""
    return {"per_call_rel_error": max(PER_CALL_FACTOR * reference["per_call_rel_error"],
                                      reference.get("per_call_pooled_rel_error", 0.0), PER_CALL_FLOOR),
            "trajectory_psnr_db": min(TRAJECTORY_PSNR_DB, reference["trajectory_psnr_db"] - TRAJECTORY_MARGIN_DB)}


def prepare(simulation: ModelFn, reference: ModelFn, calib: Any, lookup: torch.Tensor, scheduler: Any,
            *, samples: int = 32, steps: int | None = None, seed: int = 0,
            batch: int = 8) -> VerificationSet:
    """Inputs from the calibration set ``calib``: rows covering every timestep group, and
    ``samples`` trajectories conditioned as the calibration's (with its guidance and step count)."""
    from quest_export.export.parity import inputs_covering_groups

    x, t, states = calib.unet_inputs(torch.arange(len(calib)))
    rows = inputs_covering_groups(x, t.float(), states, lookup, per_group=ROWS_PER_GROUP)
    first = torch.nonzero(calib.t == calib.t.max()).flatten()[:samples]  # one row per trajectory, at its start
    cond = calib.cond[first].float()
    guidance = float(calib.meta.get("guidance", 1.0)) if calib.uncond is not None else 1.0
    traj_states = torch.cat([calib.uncond[first].float(), cond]) if guidance > 1.0 else cond
    noise = torch.randn((len(first), *calib.x.shape[1:]), generator=torch.Generator().manual_seed(seed))
    steps = int(steps or calib.meta.get("steps") or 20)
    spec = {"class": type(scheduler).__name__, "config": dict(scheduler.config)}
    tensors = {"call_sample": rows.sample.float().contiguous(), "call_timestep": rows.timestep.float().contiguous(),
               "call_states": rows.encoder_hidden_states.float().contiguous(),
               "trajectory_noise": noise, "trajectory_states": traj_states.contiguous()}
    draft = VerificationSet(tensors, _json_config(spec), steps, guidance, {}, {}, batch)
    with torch.no_grad():
        tensors["call_expected"] = torch.cat([simulation(*(tensors[k][i : i + batch] for k in CALL_KEYS[:3]))
                                              for i in range(0, len(rows.sample), batch)]).float()
        tensors["trajectory_expected"] = draft._trajectories(simulation).float()
    ref = draft.run(reference)
    draft.reference = ref
    draft.bounds = bounds_for(ref)
    return draft


def _json_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Scheduler config as plain JSON (numpy arrays and tuples become lists)."""
    import json

    return json.loads(json.dumps(spec, default=lambda v: v.tolist() if hasattr(v, "tolist") else list(v)))


def check(model: ModelFn, vset: VerificationSet) -> dict[str, Any]:
    """Run the engine on the set; the figures, the bounds and whether it passed."""
    started = time.perf_counter()
    figures = vset.run(model)
    return {**figures, "bounds": vset.bounds, "reference_graph": vset.reference, "passed": vset.judge(figures),
            "seconds": round(time.perf_counter() - started, 2)}


def failure_summary(result: dict[str, Any]) -> str:
    b = result["bounds"]
    return (f"per-call error {result['per_call_rel_error']:.3g} (median over rows; bound {b['per_call_rel_error']:.3g}, reference graph "
            f"{result['reference_graph'].get('per_call_rel_error', math.nan):.3g}), trajectory PSNR "
            f"{result['trajectory_psnr_db']:.1f} dB (bound {b['trajectory_psnr_db']:.1f} dB)")


def onnx_model_fn(session: Any) -> ModelFn:
    """An ONNX Runtime session over a UNet graph as a :data:`ModelFn` (scalar timesteps expanded)."""
    output = session.get_outputs()[0].name

    def call(sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0]).contiguous()
        feeds = {"sample": np.ascontiguousarray(sample.float().numpy()), "timestep": t.numpy(),
                 "encoder_hidden_states": np.ascontiguousarray(states.float().numpy())}
        return torch.from_numpy(session.run([output], feeds)[0].astype(np.float32))

    return call
