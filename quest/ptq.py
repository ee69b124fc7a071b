"""Post-training initialisation of quantizer ranges.

Weights: per output channel, the clipping range that minimises the quantization MSE.
Activations: per timestep group, min-max, percentile or MSE search over values observed while the
calibration set runs through the FP model. Asymmetric targets share one zero point across groups
(what one Q/DQ node with per-timestep rescaling can express); a conv's output quantizer is tied
to its input's table, so only its ratio is fitted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quest.modules import QuantConv2d, QuantLinear
from quest.profiles import QuantSpec
from quest.quantizers import ActivationQuantizer, TiedOutputQuantizer, WeightQuantizer, quantize_codes
from quest.quantize import QuantizedUNet

CLIP_RATIOS = torch.linspace(0.3, 1.0, 36)
SAMPLES_PER_GROUP = 32768
# weight elements searched at once: whole-tensor temporaries of a full-size SD UNet (36 candidates x
# 860M weights) made the search memory-bound (~4 min on 2 cores); 64K-element blocks are ~7x faster
# and give the same scales (channels are independent)
WEIGHT_BLOCK_ELEMENTS = 1 << 16


def _quant_error(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Sum of squared errors of fake-quantizing ``values`` (..., N) with broadcast ``scale``."""
    q = quantize_codes(values, scale, zero_point, spec.qmin, spec.qmax)
    return ((q - zero_point) * scale - values).pow(2).sum(-1)


@torch.no_grad()
def init_weight_scales(quantizer: WeightQuantizer, weight: torch.Tensor, method: str = "mse") -> None:
    """Per-channel symmetric scale: ``amax / qmax`` (minmax) or the MSE-optimal clipped range."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    amax = flat.abs().amax(1).clamp_min(1e-8)
    qmax = quantizer.spec.qmax
    if method == "minmax":
        quantizer.scale.copy_(amax / qmax)
        return
    ratios = CLIP_RATIOS.to(flat.device)
    scales = ratios[:, None] * amax[None, :] / qmax  # (R, C)
    zero = torch.zeros((), device=flat.device)
    best = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    rows = max(1, WEIGHT_BLOCK_ELEMENTS // flat.shape[1])
    for start in range(0, flat.shape[0], rows):  # a few channels at a time: the temporaries stay in cache
        block, block_scales = flat[start : start + rows], scales[:, start : start + rows]
        errors = torch.stack([_quant_error(block, s[:, None], zero, quantizer.spec) for s in block_scales])
        best[start : start + rows] = errors.argmin(0)
    quantizer.scale.copy_(scales[best, torch.arange(flat.shape[0], device=flat.device)])


@dataclass
class GroupObserver:
    """Per-group min, max and a bounded random sample of observed values."""

    num_groups: int
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    lo: torch.Tensor = field(init=False)
    hi: torch.Tensor = field(init=False)
    samples: list[list[torch.Tensor]] = field(init=False)

    def __post_init__(self) -> None:
        self.lo = torch.full((self.num_groups,), float("inf"))
        self.hi = torch.full((self.num_groups,), float("-inf"))
        self.samples = [[] for _ in range(self.num_groups)]

    def __call__(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        x = x.detach().float().cpu()
        groups = groups.cpu()
        flat = x.reshape(x.shape[0], -1)
        present = groups.unique().tolist()
        for g in present:
            # one group in the batch (the usual case): no masked copy of what can be a GB-sized tensor
            values = flat.reshape(-1) if len(present) == 1 else flat[groups == g].reshape(-1)
            lo, hi = torch.aminmax(values)
            self.lo[g] = min(self.lo[g].item(), lo.item())
            self.hi[g] = max(self.hi[g].item(), hi.item())
            take = min(values.numel(), 4096)
            idx = torch.randint(0, values.numel(), (take,), generator=self.generator)
            self.samples[g].append(values[idx])

    def group_values(self, g: int) -> torch.Tensor:
        values = torch.cat(self.samples[g]) if self.samples[g] else torch.zeros(1)
        if values.numel() > SAMPLES_PER_GROUP:
            idx = torch.randperm(values.numel(), generator=self.generator)[:SAMPLES_PER_GROUP]
            values = values[idx]
        return values


def _range(values: torch.Tensor, lo: float, hi: float, method: str, percentile: float) -> tuple[float, float]:
    if method == "percentile":
        q = percentile / 100.0
        return float(torch.quantile(values, 1 - q)), float(torch.quantile(values, q))
    return lo, hi


def _zero_point(lo: float, hi: float, spec: QuantSpec) -> float:
    if spec.symmetric:
        return 0.0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / (spec.qmax - spec.qmin)
    return float(min(max(round(spec.qmin - lo / scale), spec.qmin), spec.qmax))


def _covering_scale(lo: float, hi: float, zero_point: float, spec: QuantSpec) -> float:
    """Smallest scale whose grid (with ``zero_point``) covers [lo, hi]."""
    candidates = [1e-8]
    if hi > 0 and spec.qmax > zero_point:
        candidates.append(hi / (spec.qmax - zero_point))
    if lo < 0 and spec.qmin < zero_point:
        candidates.append(lo / (spec.qmin - zero_point))
    return max(candidates)


def fit_table(
    observer: GroupObserver, spec: QuantSpec, method: str, percentile: float
) -> tuple[torch.Tensor, float]:
    """(scale per group, shared zero point) for one activation quantizer."""
    ranges = [
        _range(observer.group_values(g), observer.lo[g].item(), observer.hi[g].item(), method, percentile)
        if torch.isfinite(observer.lo[g])
        else (0.0, 1.0)
        for g in range(observer.num_groups)
    ]
    zp = _zero_point(min(r[0] for r in ranges), max(r[1] for r in ranges), spec)
    zero = torch.tensor(zp)
    scales = []
    for g, (lo, hi) in enumerate(ranges):
        scale = _covering_scale(lo, hi, zp, spec)
        if method == "mse" and torch.isfinite(observer.lo[g]):
            values = observer.group_values(g)
            candidates = CLIP_RATIOS * scale
            errors = torch.stack([_quant_error(values, c, zero, spec) for c in candidates])
            scale = float(candidates[errors.argmin()])
        scales.append(scale)
    return torch.tensor(scales), zp


def fit_tied_ratio(
    observer: GroupObserver, input_scales: torch.Tensor, spec: QuantSpec, method: str, percentile: float
) -> tuple[float, float]:
    """(ratio, zero point) of a tied output quantizer: outputs are normalised by the input's per-group
    scale, then fitted as a single-group quantizer."""
    pooled = GroupObserver(1)
    for g in range(observer.num_groups):
        if torch.isfinite(observer.lo[g]):
            values = observer.group_values(g) / input_scales[g]
            pooled.lo[0] = min(pooled.lo[0].item(), observer.lo[g].item() / input_scales[g].item())
            pooled.hi[0] = max(pooled.hi[0].item(), observer.hi[g].item() / input_scales[g].item())
            pooled.samples[0].append(values)
    scales, zp = fit_table(pooled, spec, method, percentile)
    return float(scales[0]), zp


ForwardLoop = Callable[[nn.Module], None]


@torch.no_grad()
def calibrate(
    qunet: QuantizedUNet,
    forward_loop: ForwardLoop,
    weight_method: str = "mse",
    activation_method: str | None = None,
    percentile: float | None = None,
) -> None:
    """Initialise every quantizer of ``qunet`` (ModelOpt-style: a config plus a forward loop)."""
    recipe = qunet.recipe
    activation_method = activation_method or recipe.activation_init
    percentile = percentile if percentile is not None else recipe.percentile
    for module in qunet.unet.modules():
        if isinstance(module, (QuantConv2d, QuantLinear)) and module.weight_quantizer is not None:
            init_weight_scales(module.weight_quantizer, module.weight, weight_method)

    observed: list[tuple[nn.Module, GroupObserver]] = []
    for _, quantizer in qunet.activation_quantizers():
        groups = quantizer.num_groups if isinstance(quantizer, ActivationQuantizer) else qunet.context.num_groups
        observer = GroupObserver(groups)
        quantizer.observer = observer
        observed.append((quantizer, observer))
    was_training = qunet.unet.training
    qunet.unet.eval()
    try:
        forward_loop(qunet.unet)
    finally:
        for quantizer, _ in observed:
            quantizer.observer = None
        qunet.unet.train(was_training)

    for quantizer, observer in observed:
        if isinstance(quantizer, ActivationQuantizer):
            scales, zp = fit_table(observer, quantizer.spec, activation_method, percentile)
            quantizer.scale.copy_(scales)
            quantizer.zero_point.fill_(zp)
    for quantizer, observer in observed:
        if isinstance(quantizer, TiedOutputQuantizer):
            ratio, zp = fit_tied_ratio(observer, quantizer.input_quantizer.scale.detach(), quantizer.spec, activation_method, percentile)
            quantizer.log_ratio.fill_(float(torch.log(torch.tensor(ratio))))
            quantizer.zero_point.fill_(zp)
