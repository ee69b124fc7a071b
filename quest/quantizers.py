"""Uniform affine fake quantizers with straight-through rounding and learnable steps (LSQ).

The arithmetic is exactly ONNX QuantizeLinear / DequantizeLinear:
``q = clamp(round_half_even(x / s) + z, qmin, qmax)``, ``x_hat = (q - z) * s``.
Activation quantizers hold one (scale) set per timestep group; the zero point is shared by all
groups, which is what a single Q/DQ node with per-timestep rescaling can express.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from quest.profiles import QuantSpec
from quest.timesteps import TimestepContext


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Forward identity, gradient multiplied by ``factor`` (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


class _FakeQuant(torch.autograd.Function):
    """QuantizeLinear -> DequantizeLinear with the LSQ straight-through gradients, in one node.

    Written as one autograd node because the chain of elementwise ops keeps three full-size
    intermediates alive for backward; on a 64x64 UNet's (heads, 4096, 4096) softmax probabilities
    that is gigabytes per attention. This node saves only its input (usually already kept by the
    op that produced it) and recomputes the rounding in backward. Forward is the same op sequence,
    so the values are bit-identical to ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        ctx.save_for_backward(x, scale, zero_point)
        ctx.grid = (qmin, qmax)
        out = torch.div(x, scale).round_().add_(zero_point).clamp_(qmin, qmax)
        return out.sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.grid
        scaled = torch.div(x, scale)
        shifted = torch.round(scaled).add_(zero_point)
        inside = (shifted >= qmin) & (shifted <= qmax)
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # d out / d s: (q - z) - x / s inside the grid (STE rounding), the clamped level outside;
            # computed in place, before grad_x, so at most two full-size temporaries live at once
            slope = shifted.clamp_(qmin, qmax).sub_(zero_point).sub_(scaled.mul_(inside))
            grad_scale = _sum_to(slope.mul_(grad), scale.shape)
        del scaled, shifted
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[2]:
            raise RuntimeError("zero points are fixed on every target; they take no gradient")
        return grad_x, grad_scale, None, None, None


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to the shape of the tensor that was broadcast."""
    lead = grad.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1]
    return grad.sum(dim=dims, keepdim=True).reshape(shape) if dims else grad.reshape(shape)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize with STE rounding; ``scale``/``zero_point`` broadcast against ``x``."""
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _FakeQuant.apply(x, scale, zero_point, qmin, qmax)
    return torch.div(x, scale).round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


def _as_fp16(x: torch.Tensor) -> torch.Tensor:
    """The nearest FP16 number (round half to even, as numpy's and the ONNX converter's casts), in FP32."""
    return x.to(torch.float16).to(torch.float32)


# The range of a scale (or rescale factor) in an FP16 graph: the FP16 conversion
# (onnxconverter-common's convert_float_to_float16, given these bounds in export/passes.py) clamps
# every float initializer's magnitude into it before the cast. Below it a scale would round to zero
# in FP16 (a division by zero in Q), so the learned scales are kept at or above SCALE_FLOOR too.
FP16_SCALE_MIN, FP16_SCALE_MAX = 1e-7, 1e4
SCALE_FLOOR = {"fp32": 1e-8, "fp16": FP16_SCALE_MIN}


def _fp16_scale(x: torch.Tensor) -> torch.Tensor:
    """``x`` as an FP16 graph stores a scale: clamped into the conversion's range, FP16-rounded."""
    return _as_fp16(x.clamp(FP16_SCALE_MIN, FP16_SCALE_MAX))


def straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` forward, identity gradient to ``x`` (a rounding the optimiser should see through)."""
    return x + (value - x).detach()


def graph_scale_table(table: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s0, factors, effective)``: how an exported graph holds a per-timestep scale table.

    A graph with constant Q/DQ scales (TensorRT) quantizes group ``g`` as ``x * f[g] -> Q(s0)``
    with ``s0`` the table's geometric mean (factors stay near 1) and ``f[g] = s0 / s[g]``, so the
    scale it really applies is ``s0 / f[g]``. In an FP32 graph that is the table itself. An FP16
    graph stores ``s0`` and ``f`` as FP16 numbers, which moves each scale by up to 2^-11 of itself
    (0.06 steps at code 127, enough to move 2-3% of large softmax codes; ``s0 / f`` of two
    rounded numbers up to 2^-10): ``effective`` is then
    ``s0 / f`` of those FP16 numbers, and the simulation quantizes with it. One entry: ``s0`` is
    the scale (rounded in FP16), ``f`` is 1. The exporter writes ``s0`` and ``f`` from here, so both
    sides read one definition.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"unknown scale precision {precision!r}")
    t = table.detach().float()
    if t.numel() == 1:
        s0 = t.reshape(()) if precision == "fp32" else _fp16_scale(t.reshape(()))
        return s0, torch.ones_like(t), s0.reshape(t.shape)
    if precision == "fp16":
        t = t.clamp_min(FP16_SCALE_MIN)
    s0 = torch.exp(torch.log(t.double()).mean()).float()
    if precision == "fp32":
        return s0, s0 / t, t
    s0 = _fp16_scale(s0)
    factors = _fp16_scale(s0 / t)
    return s0, factors, s0 / factors


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as float) of ``x``: what QuantizeLinear would output."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


class WeightQuantizer(nn.Module):
    """Symmetric per-output-channel weight quantizer (axis 0); scales frozen after PTQ by default."""

    def __init__(self, spec: QuantSpec, num_channels: int) -> None:
        super().__init__()
        if not spec.symmetric:
            raise ValueError("weight quantizers are symmetric on every target")
        self.spec = spec
        self.scale = nn.Parameter(torch.ones(num_channels), requires_grad=False)
        self.enabled = True

    def graph_scale(self) -> torch.Tensor:
        """The per-channel scales as the graph stores them (FP16-rounded in an FP16 graph), with
        identity gradient to the learned FP32 scales."""
        if self.spec.scale_precision == "fp32":
            return self.scale
        return straight_through(self.scale, _fp16_scale(self.scale.detach()))

    def _shaped_scale(self, weight: torch.Tensor) -> torch.Tensor:
        return self.graph_scale().view(-1, *([1] * (weight.dim() - 1)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        scale = self._shaped_scale(weight)
        if self.scale.requires_grad:
            scale = grad_scale(scale, 1.0 / math.sqrt(weight[0].numel() * self.spec.qmax))
        return fake_quant(weight, scale, torch.zeros_like(scale), self.spec.qmin, self.spec.qmax)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self._shaped_scale(weight)
        return quantize_codes(weight, scale, torch.zeros_like(scale), self.spec.qmin, self.spec.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, per_channel={self.scale.numel()}, enabled={self.enabled}"


ObserveMode = Literal["off", "observe"]


class ActivationQuantizer(nn.Module):
    """Per-tensor activation quantizer with a per-timestep-group scale table.

    ``scale`` has one entry per timestep group (a single entry when the table is not used); the
    group of each sample is read from the shared :class:`TimestepContext`. In ``observe`` mode it
    passes values through and hands them to an attached observer (used by PTQ initialisation).
    """

    def __init__(self, spec: QuantSpec, num_groups: int = 1, context: TimestepContext | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.scale = nn.Parameter(torch.ones(num_groups))
        self.register_buffer("zero_point", torch.zeros(()))
        self.enabled = True
        self.observer = None  # set by calibration; receives (x, groups)
        object.__setattr__(self, "_context", context)  # shared, not a submodule

    @property
    def num_groups(self) -> int:
        return self.scale.numel()

    def bind(self, context: TimestepContext | None) -> None:
        object.__setattr__(self, "_context", context)

    def current_groups(self, batch: int, device: torch.device) -> torch.Tensor:
        context = self._context
        if self.num_groups == 1 or context is None or context.groups is None:
            if self.num_groups > 1:
                raise RuntimeError("per-timestep activation quantizer called without a timestep")
            return torch.zeros(batch, dtype=torch.long, device=device)
        groups = context.groups.to(device)
        if groups.numel() != batch:
            # attention reshapes (batch * heads, ...): repeat each sample's group per head
            if batch % groups.numel():
                raise RuntimeError(f"cannot map {groups.numel()} timestep groups onto a batch of {batch}")
            groups = groups.repeat_interleave(batch // groups.numel())
        return groups

    def graph_table(self) -> torch.Tensor:
        """The scale each timestep group really quantizes with in the exported graph
        (:func:`graph_scale_table`), with identity gradient to the learned table."""
        if self.spec.scale_precision == "fp32":
            return self.scale
        return straight_through(self.scale, graph_scale_table(self.scale, self.spec.scale_precision)[2])

    def sample_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Scale per sample, shaped to broadcast over ``x`` (batch on dim 0)."""
        groups = self.current_groups(x.shape[0], x.device)
        return self.graph_table()[groups].view(-1, *([1] * (x.dim() - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x.detach(), self.current_groups(x.shape[0], x.device))
            return x
        if not self.enabled:
            return x
        scale = self.sample_scale(x)
        if self.scale.requires_grad and torch.is_grad_enabled():
            scale = grad_scale(scale, 1.0 / math.sqrt(x[0].numel() * self.spec.qmax))
        return fake_quant(x, scale, self.zero_point, self.spec.qmin, self.spec.qmax)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_codes(x, self.sample_scale(x), self.zero_point, self.spec.qmin, self.spec.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, signed={self.spec.signed}, groups={self.num_groups}, enabled={self.enabled}"


class TiedOutputQuantizer(nn.Module):
    """Output quantizer of a Conv whose scale is tied to its input quantizer's table.

    In the exported graph the conv runs in the input's rescaled domain (``x * s0 / s_t``), so an
    output Q with constant scale ``so`` acts as scale ``so * s_t / s0`` on the true output: one
    learnable ratio ``r = so / s0`` times the input's per-timestep scale. Its zero point is fixed.
    """

    def __init__(self, spec: QuantSpec, input_quantizer: ActivationQuantizer) -> None:
        super().__init__()
        if spec.scale_precision != "fp32" or input_quantizer.spec.scale_precision != "fp32":
            # its exported scale s0 * r would need the same FP16 treatment; no FP16 target has one
            raise ValueError("tied output quantizers exist only on FP32-scale targets")
        self.spec = spec
        self.log_ratio = nn.Parameter(torch.zeros(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.enabled = True
        self.observer = None
        object.__setattr__(self, "_input", input_quantizer)  # not a submodule: the conv owns it

    @property
    def input_quantizer(self) -> ActivationQuantizer:
        """The conv's input quantizer whose per-timestep table this quantizer's scale follows."""
        return self._input

    @property
    def active(self) -> bool:
        """Quantizes only while both it and its input quantizer are enabled."""
        return self.enabled and self._input.enabled

    def sample_scale(self, y: torch.Tensor) -> torch.Tensor:
        return self._input.sample_scale(y) * self.log_ratio.exp()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(y.detach(), self._input.current_groups(y.shape[0], y.device))
            return y
        if not self.active:
            return y
        return fake_quant(y, self.sample_scale(y), self.zero_point, self.spec.qmin, self.spec.qmax)

    def codes(self, y: torch.Tensor) -> torch.Tensor:
        return quantize_codes(y, self.sample_scale(y), self.zero_point, self.spec.qmin, self.spec.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, tied to input table, enabled={self.enabled}"
