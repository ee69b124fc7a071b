"""Layer-group sensitivity: which parts of the UNet hurt most when quantized alone.

QuEST finetunes only the layers whose quantization damages the output most (and singles out the
time-embedding path, whose error reaches every ResNet). Each group of layers is quantized on its
own, every other quantizer is bypassed, and the UNet's output error against the FP model over the
calibration set ranks the groups. The quantizers' enabled flags are restored exactly afterwards.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from quest.calibration import CalibrationSet
from quest.quantize import QuantizedUNet, set_quantizers_enabled
from quest.quantizers import ActivationQuantizer, TiedOutputQuantizer, WeightQuantizer

#: Group name -> fnmatch patterns over module names of a diffusers UNet2DConditionModel (ordered).
LAYER_GROUPS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        "time_embedding": ("time_embedding.*",),
        "time_emb_proj": ("*.time_emb_proj",),
        "conv_in": ("conv_in",),
        "conv_out": ("conv_out",),
        "resnet_conv1": ("*resnets.*.conv1",),
        "resnet_conv2": ("*resnets.*.conv2",),
        "conv_shortcut": ("*resnets.*.conv_shortcut",),
        "downsamplers": ("*downsamplers.*",),
        "upsamplers": ("*upsamplers.*",),
        "attn_qkv_proj": ("*attn*.to_q", "*attn*.to_k", "*attn*.to_v"),
        "attn_out_proj": ("*attn*.to_out.0",),
        "attn_matmuls": ("*attn1", "*attn2"),
        "feed_forward": ("*ff.net.*",),
        "proj_in_out": ("*proj_in", "*proj_out"),
    }
)

#: Groups on the timestep path: their error is shared by every ResNet at a given step.
TEMPORAL_GROUPS = frozenset({"time_embedding", "time_emb_proj"})

_QUANTIZER_TYPES = (ActivationQuantizer, TiedOutputQuantizer, WeightQuantizer)


def group_layers(qunet: QuantizedUNet, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Quantized layers (as listed in ``qunet.layers``) whose name matches any pattern."""
    return [name for name in qunet.layers if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def quantizer_prefix(qunet: QuantizedUNet, layer: str) -> str:
    """Attention layers own only their processor's quantizers (their projections are Linear layers)."""
    return f"{layer}.processor." if qunet.layers[layer].kind == "attention" else f"{layer}."


def group_quantizers(qunet: QuantizedUNet, layers: list[str]) -> list[str]:
    """Names of the quantizer modules that belong to ``layers``."""
    prefixes = tuple(quantizer_prefix(qunet, layer) for layer in layers)
    return [name for name, _ in _quantizers(qunet) if prefixes and name.startswith(prefixes)]


def ungrouped_layers(qunet: QuantizedUNet) -> list[str]:
    """Quantized layers that no group of :data:`LAYER_GROUPS` covers (worth a look in a report)."""
    covered = {layer for patterns in LAYER_GROUPS.values() for layer in group_layers(qunet, patterns)}
    return [name for name in qunet.layers if name not in covered]


def _quantizers(qunet: QuantizedUNet) -> Iterator[tuple[str, nn.Module]]:
    for name, module in qunet.unet.named_modules():
        if isinstance(module, _QUANTIZER_TYPES):
            yield name, module


def _snapshot(qunet: QuantizedUNet) -> dict[str, bool]:
    return {name: bool(module.enabled) for name, module in _quantizers(qunet)}


def _restore(qunet: QuantizedUNet, state: dict[str, bool]) -> None:
    for name, module in _quantizers(qunet):
        if name in state:
            module.enabled = state[name]


def _enable_only(qunet: QuantizedUNet, layers: list[str]) -> int:
    """Bypass every quantizer, then enable those of ``layers``; returns how many were enabled."""
    set_quantizers_enabled(qunet, False)
    return sum(set_quantizers_enabled(qunet, True, quantizer_prefix(qunet, layer) + "*") for layer in layers)


def stratified_rows(calib: CalibrationSet, max_rows: int | None) -> CalibrationSet:
    """At most ``max_rows`` rows, taken round-robin over timesteps so every step stays represented."""
    if max_rows is None or max_rows >= len(calib):
        return calib
    if max_rows < 1:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    per_step = [torch.nonzero(calib.t == t).flatten().tolist() for t in calib.timesteps]
    picked: list[int] = []
    for rank in range(max(len(rows) for rows in per_step)):
        picked += [rows[rank] for rows in per_step if rank < len(rows)]
    index = torch.tensor(sorted(picked[:max_rows]))
    uncond = None if calib.uncond is None else calib.uncond[index]
    return CalibrationSet(calib.x[index], calib.t[index], calib.cond[index], uncond, dict(calib.meta))


def _unet_device(unet: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(unet.parameters())
    return param.device, param.dtype


@torch.no_grad()
def _outputs(qunet: QuantizedUNet, calib: CalibrationSet, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(timesteps, float output) per batch, in the calibration set's fixed order (no shuffling)."""
    device, dtype = _unet_device(qunet.unet)
    for x, t, states in calib.batches(batch_size):
        x, states = x.to(device, dtype), states.to(device, dtype)
        out = qunet.unet(x, t.to(device), encoder_hidden_states=states).sample
        yield t.cpu(), out.float().cpu()


def fp_reference(qunet: QuantizedUNet, calib: CalibrationSet, batch_size: int = 64) -> list[torch.Tensor]:
    """The FP model's outputs per batch (all quantizers bypassed; flags restored afterwards)."""
    state = _snapshot(qunet)
    try:
        set_quantizers_enabled(qunet, False)
        return [out for _, out in _outputs(qunet, calib, batch_size)]
    finally:
        _restore(qunet, state)


@dataclass
class _ErrorSums:
    """Squared-error sums and element counts, overall and per timestep, in float64."""

    total: float = 0.0
    count: int = 0
    per_t: dict[int, list[float]] = field(default_factory=dict)

    def add(self, t: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> None:
        per_row = (out.double() - ref.double()).pow(2).reshape(out.shape[0], -1)
        elements = per_row.shape[1]
        for value in t.unique().tolist():
            rows = per_row[t == value]
            entry = self.per_t.setdefault(int(value), [0.0, 0])
            entry[0] += float(rows.sum())
            entry[1] += rows.numel()
        self.total += float(per_row.sum())
        self.count += per_row.shape[0] * elements

    def mse(self) -> float:
        return self.total / max(self.count, 1)

    def mse_per_timestep(self) -> dict[str, float]:
        return {str(t): s / max(n, 1) for t, (s, n) in sorted(self.per_t.items(), reverse=True)}


def output_error(
    qunet: QuantizedUNet, calib: CalibrationSet, reference: list[torch.Tensor], batch_size: int = 64
) -> tuple[float, dict[str, float]]:
    """MSE of the UNet's output (quantizers as currently set) vs ``reference``: overall, per timestep."""
    sums = _ErrorSums()
    for (t, out), ref in zip(_outputs(qunet, calib, batch_size), reference, strict=True):
        sums.add(t, out, ref)
    return sums.mse(), sums.mse_per_timestep()


def _measure_group(
    qunet: QuantizedUNet, calib: CalibrationSet, reference: list[torch.Tensor], group: str, layers: list[str], batch_size: int
) -> dict[str, Any]:
    quantizers = _enable_only(qunet, layers)
    mse, per_t = output_error(qunet, calib, reference, batch_size)
    return {
        "group": group,
        "temporal": group in TEMPORAL_GROUPS,
        "layers": len(layers),
        "quantizers": quantizers,
        "mse": mse,
        "mse_per_timestep": per_t,
    }


def measure_sensitivity(
    qunet: QuantizedUNet, calib: CalibrationSet, batch_size: int = 64, max_rows: int | None = None
) -> list[dict[str, Any]]:
    """Output MSE vs FP with only one layer group quantized, for every group; worst first.

    ``qunet`` must already be calibrated. Groups that match no quantized layer are skipped. The
    quantizers' enabled flags and the train/eval mode are restored afterwards, exactly.
    """
    with isolated_measurement(qunet, calib, max_rows, batch_size) as (calib, reference):
        results = []
        for group, patterns in LAYER_GROUPS.items():
            layers = group_layers(qunet, patterns)
            if layers:
                results.append(_measure_group(qunet, calib, reference, group, layers, batch_size))
    return sorted(results, key=lambda r: r["mse"], reverse=True)


@contextmanager
def isolated_measurement(qunet: QuantizedUNet, calib: CalibrationSet, max_rows: int | None,
                         batch_size: int = 64) -> Iterator[tuple[CalibrationSet, list[torch.Tensor]]]:
    """The setting of every "switch some quantizers on alone" measurement: yields the stratified
    rows and the FP outputs on them, in eval mode; enabled flags and train/eval mode are restored
    exactly afterwards, whatever the caller switched."""
    calib = stratified_rows(calib, max_rows)
    state, was_training = _snapshot(qunet), qunet.unet.training
    qunet.unet.eval()
    try:
        yield calib, fp_reference(qunet, calib, batch_size)
    finally:
        _restore(qunet, state)
        qunet.unet.train(was_training)


def sensitivity_report(results: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: run metadata first, then the ranking and its temporal subset."""
    head = {key: meta.get(key) for key in ("model", "bits", "target")}
    rest = {key: value for key, value in meta.items() if key not in head}
    return {
        **head,
        **rest,
        "ranking": results,
        "temporal": [r for r in results if r["temporal"]],
    }
