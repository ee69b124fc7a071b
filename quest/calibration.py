"""Calibration set: UNet inputs recorded along the FP model's own sampling trajectories.

A forward pre-hook on the UNet records ``(x_t, t, cond, uncond)`` for every call the deployment
sampler makes, so the set sees exactly the distribution the engine will see (any pipeline, any
scheduler). Stored as safetensors plus a JSON sidecar; finetuning and export reuse it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "quest-calibration/1"
# attention scores grow with tokens^2: above this many latent tokens per sample, forward passes
# take fewer samples at a time (a 64x64 SD latent has 4096 tokens: one row, two samples with CFG)
FULL_BATCH_TOKENS = 1024


def samples_per_call(batch: int, tokens: int) -> int:
    """``batch``, lowered for large latents so that one forward's attention scores stay bounded
    (they are samples x heads x tokens^2: at 4096 tokens one guided row holds 1 GiB per layer).
    The one rule for every pass over many inputs: PTQ, parity, engine verification."""
    if tokens <= FULL_BATCH_TOKENS:
        return batch
    return max(1, min(batch, int(batch * (FULL_BATCH_TOKENS / tokens) ** 3)))


@dataclass
class CalibrationSet:
    """One row per (trajectory, recorded step). ``uncond`` is None without guidance."""

    x: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def timesteps(self) -> list[int]:
        return sorted({int(v) for v in self.t.tolist()}, reverse=True)

    def unet_inputs(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched UNet inputs for rows ``index``; with guidance the batch is [uncond; cond] as at run time."""
        x, t, cond = self.x[index], self.t[index], self.cond[index]
        if self.uncond is None:
            return x, t, cond
        return torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.uncond[index], cond])

    def to(self, device: torch.device | str) -> "CalibrationSet":
        """The same rows on ``device`` (the model's device: batches are then sliced there)."""
        if self.x.device == torch.device(device):
            return self
        move = lambda tensor: None if tensor is None else tensor.to(device)  # noqa: E731
        return CalibrationSet(move(self.x), move(self.t), move(self.cond), move(self.uncond), self.meta)

    def rows_per_call(self, batch_size: int) -> int:
        """Rows per forward pass over the set: :func:`samples_per_call` for its latent size."""
        return samples_per_call(batch_size, int(self.x[0, 0].numel()) if self.x.dim() >= 3 else 1)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batch_size = self.rows_per_call(batch_size)
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield self.unet_inputs(order[start : start + batch_size])

    def validate(self) -> None:
        """Refuse inconsistent or non-finite data, naming the tensor (before any long work uses it)."""
        rows = int(self.x.shape[0]) if self.x.dim() else 0
        if rows == 0:
            raise ValueError("calibration tensor 'x' holds no rows")
        for name, tensor in (("t", self.t), ("cond", self.cond), ("uncond", self.uncond)):
            if tensor is not None and (tensor.dim() == 0 or int(tensor.shape[0]) != rows):
                raise ValueError(f"calibration tensor {name!r} has {int(tensor.shape[0]) if tensor.dim() else 0} rows, 'x' has {rows}")
        if self.uncond is not None and self.uncond.shape != self.cond.shape:
            raise ValueError(f"calibration tensor 'uncond' has shape {tuple(self.uncond.shape)}, 'cond' {tuple(self.cond.shape)}")
        for name, tensor in (("x", self.x), ("cond", self.cond), ("uncond", self.uncond)):
            if tensor is not None and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).reshape(rows, -1).any(dim=1).sum())
                raise ValueError(f"calibration tensor {name!r} contains NaN or Inf (in {bad} of {rows} rows)")
        if self.t.dtype.is_floating_point and not torch.isfinite(self.t).all():
            raise ValueError("calibration tensor 't' contains NaN or Inf")
        if int(self.t.min()) < 0:
            raise ValueError(f"calibration tensor 't' holds a negative timestep ({int(self.t.min())})")

    def save(self, path: Path) -> None:
        """Write ``path`` (safetensors) and ``path.with_suffix('.json')``; callers rename atomically."""
        tensors = {"x": self.x.cpu().contiguous(), "t": self.t.cpu().contiguous(), "cond": self.cond.cpu().contiguous()}
        if self.uncond is not None:
            tensors["uncond"] = self.uncond.cpu().contiguous()
        save_file(tensors, str(path), metadata={"format": FORMAT})

    @classmethod
    def load(cls, path: Path, meta: dict[str, Any] | None = None) -> "CalibrationSet":
        tensors = load_file(str(path))
        missing = {"x", "t", "cond"} - set(tensors)
        if missing:
            raise ValueError(f"{path} is not a calibration set (missing {', '.join(sorted(missing))})")
        t = tensors["t"]
        if t.dtype.is_floating_point and not torch.isfinite(t).all():
            raise ValueError("calibration tensor 't' contains NaN or Inf")
        calib = cls(tensors["x"], t.long(), tensors["cond"], tensors.get("uncond"), meta or {})
        calib.validate()
        return calib


class TrajectoryRecorder:
    """Records the UNet's inputs during sampling (a forward pre-hook)."""

    def __init__(self, unet: nn.Module, keep_timesteps: set[int] | None = None) -> None:
        self.unet = unet
        self.keep = keep_timesteps
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._handle = None

    def __enter__(self) -> "TrajectoryRecorder":
        self._handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        t_int = int(torch.as_tensor(timestep).reshape(-1)[0].round())
        if self.keep is not None and t_int not in self.keep:
            return
        batch = sample.shape[0]
        t = torch.as_tensor(timestep).reshape(-1).round().long().expand(batch).cpu()
        sample, states = sample.detach().float().cpu(), states.detach().float().cpu()
        # a guided batch is [uncond; cond] with identical latents in both halves
        if batch % 2 == 0 and torch.equal(sample[: batch // 2], sample[batch // 2 :]):
            half = batch // 2
            self.rows.append((sample[half:], t[half:], states[half:], states[:half]))
        else:
            self.rows.append((sample, t, states, None))

    def result(self, meta: dict[str, Any]) -> CalibrationSet:
        if not self.rows:
            raise ValueError("no UNet calls were recorded; check the sampler settings")
        guided = all(r[3] is not None for r in self.rows)
        x = torch.cat([r[0] for r in self.rows])
        t = torch.cat([r[1] for r in self.rows])
        cond = torch.cat([r[2] for r in self.rows])
        uncond = torch.cat([r[3] for r in self.rows]) if guided else None
        return CalibrationSet(x, t, cond, uncond, meta)


def record_calibration(
    unet: nn.Module, run_sampler: Callable[[], Any], keep_timesteps: set[int] | None, meta: dict[str, Any]
) -> CalibrationSet:
    """Run ``run_sampler`` (the FP pipeline with the deployment scheduler) and record the UNet inputs."""
    with torch.no_grad(), TrajectoryRecorder(unet, keep_timesteps) as recorder:
        run_sampler()
    calib = recorder.result(meta)
    calib.validate()
    return calib


def meta_to_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, indent=2, sort_keys=True)
