"""QuEST selective finetuning, in two stages, on the target profile's own simulation.

Stage 1 (temporal alignment) trains the ResNet ``time_emb_proj`` layers and their activation
scales; stage 2 (critical-module alignment) trains the attention-related layers (feed-forward,
and for class-conditional models ``to_q`` and self-attention ``to_k``/``to_v``) plus the remaining
activation scales. Loss = local output MSE of the trained layers vs FP + final noise MSE vs FP.
Weight-quantizer scales stay frozen; no parameters are added.

Runs survive: batches are a pure function of (seed, stage, step), the full training state
(model tensors, Adam moments, position, loss log) is one safetensors file written atomically every
``checkpoint_every`` steps and on SIGINT/SIGTERM, and resuming continues bit-for-bit.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from quest.calibration import CalibrationSet
from quest.checkpoint import tensors_for_file
from quest.distributed import DistContext
from quest.errors import QuantConfigError
from quest.modules import QuantConv2d, QuantLinear
from quest.quantize import QuantizedUNet
from quest.quantizers import SCALE_FLOOR, ActivationQuantizer, TiedOutputQuantizer
from quest.teacher import fp_copy, run_teacher  # noqa: F401 - fp_copy re-exported for callers
from quest.recipe_blocks import (  # noqa: F401 - the finetuner's settings, re-exported
    ATTENTION_LAYERS,
    CLASS_CONDITIONAL_ATTENTION,
    FINETUNE_LOSSES,
    TEMPORAL_LAYERS,
    FinetuneSettings,
    StageSpec,
    blockwise_stages,
    default_stages,
    settings_from_recipe,
)

STATE_FORMAT = "quest-finetune-state/1"


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _quant_layers(unet: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, (QuantConv2d, QuantLinear)) and _matches(n, patterns)}


def _scale_params(unet: nn.Module, stage: StageSpec) -> tuple[list[tuple[str, nn.Parameter]], dict[str, float]]:
    """The stage's trainable quantizer parameters, and the floor of each learned scale (the
    smallest scale its graph precision holds: a step past zero must not become a zero Q scale)."""
    params, floors = [], {}
    for name, module in unet.named_modules():
        if not _matches(name, stage.scales) or _matches(name, stage.exclude_scales):
            continue
        if isinstance(module, ActivationQuantizer) and module.enabled:
            params.append((f"{name}.scale", module.scale))
            floors[f"{name}.scale"] = SCALE_FLOOR[module.spec.scale_precision]
        elif isinstance(module, TiedOutputQuantizer) and module.enabled:
            params.append((f"{name}.log_ratio", module.log_ratio))
    return params, floors


@dataclass
class StagePlan:
    stage: StageSpec
    layers: dict[str, nn.Module]
    weights: list[tuple[str, nn.Parameter]]
    scales: list[tuple[str, nn.Parameter]]
    scale_floors: dict[str, float]

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.weights] + [p for _, p in self.scales]

    @torch.no_grad()
    def clamp_scales(self) -> None:
        """Keep every learned scale at or above its floor after an optimizer step."""
        for name, p in self.scales:
            if name in self.scale_floors:
                p.clamp_(min=self.scale_floors[name])


def plan_stage(unet: nn.Module, stage: StageSpec) -> StagePlan:
    layers = _quant_layers(unet, stage.weights)
    if not layers and stage.weights:
        raise QuantConfigError(f"finetune stage {stage.name!r}: weight patterns {stage.weights} match no quantized layer")
    weights = []
    for name, module in layers.items():
        weights.append((f"{name}.weight", module.weight))
        if module.bias is not None:
            weights.append((f"{name}.bias", module.bias))
    return StagePlan(stage, layers, weights, *_scale_params(unet, stage))


def batch_indices(seed: int, stage_index: int, step: int, rows: int, batch_size: int) -> torch.Tensor:
    """The rows of one step: a pure function of its position, so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + stage_index * 7919 + step)
    return torch.randperm(rows, generator=generator)[: min(batch_size, rows)]


@contextmanager
def _capture_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: outputs.__setitem__(n, o)) for n, m in modules.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived; the state was saved at a step boundary."""

    def __init__(self, state_path: str, signal_name: str | None = None) -> None:
        super().__init__(state_path)
        self.state_path = state_path
        self.signal_name = signal_name


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    flag: dict[str, Any] = {"stop": False, "signal": None}

    def handler(signum: int, _frame: Any) -> None:
        flag["stop"] = True
        flag["signal"] = signal.Signals(signum).name

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in previous:
            signal.signal(sig, handler)
    except ValueError:  # not the main thread: no signal handling
        previous = {}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _gradient_checkpointing(unet: nn.Module, enabled: bool) -> Iterator[None]:
    """diffusers' block-level activation recomputation on the student for the duration of a run."""
    if not enabled:
        yield
        return
    if not getattr(unet, "_supports_gradient_checkpointing", False):
        raise QuantConfigError(f"recipe finetune.gradient_checkpointing: {type(unet).__name__} does not support it; set it to false")
    unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        unet.disable_gradient_checkpointing()


class QuestFinetuner:
    """Runs the stages on a quantized UNet against its FP twin over a calibration set."""

    def __init__(
        self,
        qunet: QuantizedUNet,
        fp_unet: nn.Module,
        calib: CalibrationSet,
        settings: FinetuneSettings,
        state_path: Path | None = None,
        dist: DistContext | None = None,
        fingerprint: str = "",
    ) -> None:
        self.qunet = qunet
        self.fp_unet = fp_unet.eval()
        self.calib = calib
        self.settings = settings
        self.state_path = Path(state_path) if state_path else None
        self.dist = dist or DistContext()
        self.fingerprint = f"{settings.fingerprint()}:{fingerprint}"
        self.log: list[dict[str, Any]] = []
        for p in self.fp_unet.parameters():
            p.requires_grad_(False)

    # -- state -----------------------------------------------------------------------------
    def _save_state(self, stage_index: int, next_step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.state_path is None or not self.dist.is_main:
            return
        tensors = tensors_for_file(self.qunet.unet.state_dict(), prefix="model.")
        moments = {f"optim.{index}.{key}": torch.as_tensor(value) for index, state in optimizer.state_dict()["state"].items()
                   for key, value in state.items()}
        tensors.update(tensors_for_file(moments))
        header = {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "stage": stage_index, "next_step": next_step, "log": self.log}
        tmp = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"state": json.dumps(header)})
        os.replace(tmp, self.state_path)

    def _load_state(self) -> tuple[int, int, dict[str, dict[str, torch.Tensor]]] | None:
        if self.state_path is None or not self.state_path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(self.state_path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {}).get("state", "{}"))
            tensors = load_file(str(self.state_path))
        except Exception as exc:  # noqa: BLE001 - damaged file
            raise QuantConfigError(f"cannot read finetuning state {self.state_path} ({type(exc).__name__}); delete it to start over") from None
        if header.get("format") != STATE_FORMAT or header.get("fingerprint") != self.fingerprint:
            raise QuantConfigError(
                f"finetuning state {self.state_path} belongs to a run with other settings or data; delete it or rerun those settings"
            )
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.qunet.unet.load_state_dict(model_state, strict=True)
        optim: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim.setdefault(index, {})[name] = value
        self.log = header.get("log", [])
        return int(header["stage"]), int(header["next_step"]), optim

    # -- training ------------------------------------------------------------------------
    def _optimizer(self, plan: StagePlan) -> torch.optim.Optimizer:
        groups = []
        if plan.weights:
            groups.append({"params": [p for _, p in plan.weights], "lr": plan.stage.weight_lr})
        if plan.scales:
            groups.append({"params": [p for _, p in plan.scales], "lr": plan.stage.scale_lr})
        return torch.optim.Adam(groups)

    def _set_trainable(self, plan: StagePlan) -> None:
        for p in self.qunet.unet.parameters():
            p.requires_grad_(False)
        for p in plan.params:
            p.requires_grad_(True)

    def _step_loss(self, plan: StagePlan, rows: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        x, t, states = self.calib.unet_inputs(rows)
        if self.settings.loss == "blockwise":
            from quest.blockwise import blockwise_loss

            return blockwise_loss(self.qunet, self.fp_unet, x, t, states)
        fp_layers = {n: self.fp_unet.get_submodule(n) for n in plan.layers}
        with torch.no_grad(), _capture_outputs(fp_layers) as fp_out:
            target = run_teacher(self.fp_unet, x, t, states)
        with _capture_outputs(plan.layers) as q_out:
            pred = self.qunet.unet(x, t, encoder_hidden_states=states).sample
        final = F.mse_loss(pred, target)
        local = torch.stack([F.mse_loss(q_out[n], fp_out[n].float()) for n in plan.layers]).mean() if plan.layers else pred.new_zeros(())
        return final + plan.stage.local_loss_weight * local, final.detach().item(), local.detach().item()

    def run(self, resume: bool = False, progress: Callable[[str, int, int, dict[str, float]], None] | None = None) -> list[dict[str, Any]]:
        """Run every stage; returns the loss log. Raises StopRequested after saving on a signal."""
        start_stage, start_step, optim_state = 0, 0, {}
        if resume:
            loaded = self._load_state()
            if loaded is not None:
                start_stage, start_step, optim_state = loaded
        elif self.state_path is not None and self.state_path.exists() and self.dist.is_main:
            self.state_path.unlink()
        self.qunet.unet.eval()
        rows = len(self.calib)
        with _stop_on_signals() as flag, _gradient_checkpointing(self.qunet.unet, self.settings.gradient_checkpointing):
            for stage_index, stage in enumerate(self.settings.stages):
                if stage_index < start_stage:
                    continue
                plan = plan_stage(self.qunet.unet, stage)
                self._set_trainable(plan)
                optimizer = self._optimizer(plan)
                first = start_step if stage_index == start_stage else 0
                if stage_index == start_stage and optim_state:
                    saved = {int(i): {k: (v if k != "step" else v.clone()) for k, v in s.items()} for i, s in optim_state.items()}
                    optimizer.load_state_dict({"state": saved, "param_groups": optimizer.state_dict()["param_groups"]})
                started = time.perf_counter()
                for step in range(first, stage.steps):
                    indices = self.dist.shard(batch_indices(self.settings.seed, stage_index, step, rows, stage.batch_size))
                    optimizer.zero_grad(set_to_none=True)
                    loss, final, local = self._step_loss(plan, indices)
                    loss.backward()
                    self.dist.average_gradients(plan.params)
                    optimizer.step()
                    plan.clamp_scales()
                    record = {"stage": stage.name, "step": step, "loss": self.dist.average(loss.detach().item()), "final_mse": self.dist.average(final), "local_mse": self.dist.average(local)}
                    if not math.isfinite(record["loss"]):
                        raise QuantConfigError(
                            f"finetuning diverged: stage {stage.name!r} step {step} has loss {record['loss']} (the weights are "
                            "now NaN/Inf); lower the stage's learning rates in the recipe"
                        )
                    self.log.append(record)
                    if progress is not None:
                        progress(stage.name, step + 1, stage.steps, record)
                    done = step + 1
                    if flag["stop"] or (done % self.settings.checkpoint_every == 0 and done < stage.steps):
                        self._save_state(stage_index, done, optimizer)
                        if flag["stop"]:
                            raise StopRequested(str(self.state_path), flag["signal"])
                self.log.append({"stage": stage.name, "done": True, "seconds": round(time.perf_counter() - started, 2), "trainable_weights": len(plan.weights), "trainable_scales": len(plan.scales)})
                self._save_state(stage_index + 1, 0, torch.optim.Adam([nn.Parameter(torch.zeros(1))]))
                start_step, optim_state = 0, {}
        for p in self.qunet.unet.parameters():
            p.requires_grad_(False)
        return self.log

    def discard_state(self) -> None:
        if self.state_path is not None and self.dist.is_main:
            self.state_path.unlink(missing_ok=True)

