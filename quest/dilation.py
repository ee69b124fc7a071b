"""Weight dilation (DilateQuant): shrink activation ranges with an exact, foldable channel rescale.

For a layer ``y = W x`` whose input channel ``j`` is produced by a per-channel affine op, scaling
column ``j`` of ``W`` by ``s_j`` and the producer's channel ``j`` by ``1 / s_j`` leaves ``y``
unchanged in exact arithmetic. Dilation picks ``s_j >= 1`` only where the weights have headroom:
``|W[i, j]| * s_j`` never exceeds row ``i``'s current range ``max_k |W[i, k]|``, so every
per-output-channel weight range (and therefore every weight quantizer step) is unchanged, while the
activation channels with the largest values shrink. The factors are folded into FP parameters
before PTQ, so the exported graph and the engines' arithmetic do not change at all.

Smoothing (SmoothQuant) uses the same folds with ``s_j = amax_j^alpha / wmax_j^(1 - alpha)``: it
lets weight ranges grow to flatten the activation channels, which 4-bit activations need more than
4-bit weights need their headroom.

Exact folds (the producer is per-channel affine, and its output feeds only the listed consumers):

- ``LayerNorm`` gamma/beta of a transformer block -> ``attn1.to_q/to_k/to_v`` (``norm1``),
  ``attn2.to_q`` (``norm2``, cross-attention), ``ff.net.0.proj`` (``norm3``);
- the transformer's ``GroupNorm`` gamma/beta -> ``proj_in``;
- ``to_v`` output rows -> ``to_out.0`` input columns (attention is linear in ``v``);
- the value half of ``GEGLU``'s ``ff.net.0.proj`` rows -> ``ff.net.2`` input columns.

Not folded, because no exact per-channel fold exists inside the graph: inputs after SiLU (ResNet
``conv1``/``conv2``, ``time_emb_proj``, ``time_embedding.linear_2``, ``conv_out``), inputs that are
residual sums or concatenations (``conv_shortcut``, ``proj_out``, down/upsampler convs), model
inputs (``conv_in``, ``time_embedding.linear_1``, cross-attention ``to_k``/``to_v`` on
``encoder_hidden_states``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quest.calibration import CalibrationSet

FOLD_CHECK_RTOL = 1e-4  # float32 round-off of the fold, relative to the output's magnitude


@dataclass
class Fold:
    """One exact fold: ``producer`` channel ``j`` divided by ``s_j``, ``consumers`` columns times ``s_j``.

    ``kind`` is ``norm`` (affine weight/bias), ``rows`` (output rows ``[0, channels)`` of a Linear,
    with bias) and says how the producer is rescaled. ``observed`` is the module whose output
    (``observe_input=False``) or input (``True``) carries the activation channels on its last dim
    (dim 1 for 4-D tensors).
    """

    name: str
    kind: str
    producer: nn.Module
    consumers: dict[str, nn.Module]
    channels: int
    observed: nn.Module
    observe_input: bool = False
    amax: torch.Tensor | None = field(default=None, repr=False)


def _affine(norm: nn.Module) -> bool:
    return isinstance(norm, (nn.LayerNorm, nn.GroupNorm)) and getattr(norm, "weight", None) is not None and getattr(norm, "bias", None) is not None


def _is_linear_or_1x1(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def find_folds(unet: nn.Module) -> list[Fold]:
    """Every exact fold of a diffusers UNet (transformer blocks and their input projections)."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import BasicTransformerBlock

    folds: list[Fold] = []
    for name, module in unet.named_modules():
        norm = getattr(module, "norm", None)
        proj_in = getattr(module, "proj_in", None)
        if getattr(module, "is_input_continuous", False) and isinstance(norm, nn.GroupNorm) and _affine(norm) and proj_in is not None and _is_linear_or_1x1(proj_in):
            folds.append(Fold(f"{name}.norm", "norm", norm, {f"{name}.proj_in": proj_in}, norm.num_channels, norm))
        if not isinstance(module, BasicTransformerBlock) or module.norm_type != "layer_norm" or module.pos_embed is not None:
            continue
        attn1, attn2, ff = module.attn1, module.attn2, module.ff
        if _affine(module.norm1) and not module.only_cross_attention and attn1.group_norm is None and attn1.spatial_norm is None:
            consumers = {f"{name}.attn1.{p}": getattr(attn1, p) for p in ("to_q", "to_k", "to_v")}
            folds.append(Fold(f"{name}.norm1", "norm", module.norm1, consumers, module.norm1.normalized_shape[0], module.norm1))
        if attn2 is not None and attn2.is_cross_attention and _affine(module.norm2) and attn2.group_norm is None and attn2.spatial_norm is None:
            folds.append(Fold(f"{name}.norm2", "norm", module.norm2, {f"{name}.attn2.to_q": attn2.to_q}, module.norm2.normalized_shape[0], module.norm2))
        first = ff.net[0]
        if _affine(module.norm3) and isinstance(getattr(first, "proj", None), nn.Linear):
            folds.append(Fold(f"{name}.norm3", "norm", module.norm3, {f"{name}.ff.net.0.proj": first.proj}, module.norm3.normalized_shape[0], module.norm3))
        for attn_name, attn in (("attn1", attn1), ("attn2", attn2)):
            if attn is not None and isinstance(attn.to_out[0], nn.Linear):
                folds.append(Fold(f"{name}.{attn_name}.to_v", "rows", attn.to_v, {f"{name}.{attn_name}.to_out.0": attn.to_out[0]}, attn.to_v.out_features, attn.to_v))
        last = ff.net[2] if len(ff.net) > 2 else None
        if isinstance(first, GEGLU) and isinstance(last, nn.Linear) and isinstance(ff.net[1], nn.Dropout):
            half = first.proj.out_features // 2
            folds.append(Fold(f"{name}.ff.net.0.proj[value]", "rows", first.proj, {f"{name}.ff.net.2": last}, half, last, observe_input=True))
    return folds


def _channel_amax(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().abs().float()
    if x.dim() == 4:  # (B, C, H, W)
        return x.amax(dim=(0, 2, 3))
    return x.reshape(-1, x.shape[-1]).amax(0)


@torch.no_grad()
def observe_channel_ranges(unet: nn.Module, folds: list[Fold], calib: CalibrationSet, batch_size: int = 64) -> None:
    """Per-channel max |activation| at every fold, over the whole calibration set (FP model)."""
    for fold in folds:
        fold.amax = None

    def record(fold: Fold, x: torch.Tensor) -> None:
        amax = _channel_amax(x[..., : fold.channels] if x.dim() != 4 else x)
        fold.amax = amax if fold.amax is None else torch.maximum(fold.amax, amax)

    handles = []
    for fold in folds:
        if fold.observe_input:
            handles.append(fold.observed.register_forward_pre_hook(lambda _m, args, f=fold: record(f, args[0])))
        else:
            handles.append(fold.observed.register_forward_hook(lambda _m, _i, out, f=fold: record(f, out)))
    try:
        for x, t, states in calib.batches(batch_size):
            unet(x, t, encoder_hidden_states=states)
    finally:
        for handle in handles:
            handle.remove()


def _columns(weight: torch.Tensor) -> torch.Tensor:
    """|W| as (out, in) with each input column's largest magnitude over the kernel."""
    w = weight.detach().abs().float()
    return w.reshape(w.shape[0], w.shape[1], -1).amax(-1)


def headroom(consumers: list[torch.Tensor]) -> torch.Tensor:
    """Largest factor per input column that keeps every consumer row inside its current range."""
    limits = []
    for weight in consumers:
        cols = _columns(weight)
        row_max = cols.amax(1, keepdim=True)
        ratio = torch.where(cols > 0, row_max / cols.clamp_min(1e-30), torch.full_like(cols, float("inf")))
        limits.append(ratio.amin(0))
    return torch.stack(limits).amin(0)


def dilation_factors(amax: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """``s_j`` that brings the activation range down to the smallest reachable value
    ``R = max_j amax_j / limit_j``, dilating only the channels above it (``1 <= s_j <= limit_j``)."""
    amax = amax.float()
    finite = torch.where(torch.isfinite(limit), limit, torch.full_like(limit, 1e30))
    target = (amax / finite).amax().clamp_min(1e-12)
    return torch.minimum((amax / target).clamp_min(1.0), finite)


@torch.no_grad()
def apply_fold(fold: Fold, s: torch.Tensor) -> None:
    """Divide the producer's channels by ``s`` and multiply the consumers' columns by ``s``."""
    producer = fold.producer
    n = fold.channels
    if fold.kind == "norm":
        producer.weight.div_(s.to(producer.weight.dtype))
        producer.bias.div_(s.to(producer.bias.dtype))
    else:
        producer.weight[:n].div_(s.to(producer.weight.dtype)[:, None])
        if producer.bias is not None:
            producer.bias[:n].div_(s.to(producer.bias.dtype))
    for consumer in fold.consumers.values():
        shape = [1, -1] + [1] * (consumer.weight.dim() - 2)
        consumer.weight.mul_(s.to(consumer.weight.dtype).view(shape))


def consumer_column_amax(fold: Fold) -> torch.Tensor:
    """Largest |weight| of each input column over all of the fold's consumers."""
    return torch.stack([_columns(c.weight).amax(0) for c in fold.consumers.values()]).amax(0)


@torch.no_grad()
def fold_channel_factors(unet: nn.Module, calib: CalibrationSet, factors: Callable[[Fold], torch.Tensor], check: bool = True) -> dict[str, Any]:
    """Fold ``factors(fold)`` (one per channel, the activation is divided by it) into every exact
    fold of the FP ``unet`` in place, before quantization; returns a per-fold summary.

    With ``check`` the output on one calibration batch is compared before and after the folds, so
    a fold that is not exact for this architecture fails loudly instead of changing the model.
    """
    was_training = unet.training
    unet.eval()
    folds = find_folds(unet)
    observe_channel_ranges(unet, folds, calib)
    probe = next(calib.batches(16)) if check else None
    before = unet(probe[0], probe[1], encoder_hidden_states=probe[2]).sample if probe else None
    summary: dict[str, Any] = {"folds": len(folds), "layers": {}}
    for fold in folds:
        if fold.amax is None:
            continue  # not reached by this model's forward pass
        weight_before = float(consumer_column_amax(fold).max())
        s = factors(fold)
        apply_fold(fold, s)
        summary["layers"][fold.name] = {
            "range_before": round(float(fold.amax.max()), 4),
            "range_after": round(float((fold.amax / s).max()), 4),
            "weight_range_ratio": round(float(consumer_column_amax(fold).max()) / max(weight_before, 1e-30), 4),
            "max_factor": round(float(s.max()), 3),
            "min_factor": round(float(s.min()), 3),
            "dilated_channels": int((s > 1.0 + 1e-6).sum()),
        }
    if probe is not None:
        after = unet(probe[0], probe[1], encoder_hidden_states=probe[2]).sample
        error = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
        summary["fold_check_max_rel_error"] = error
        if error > FOLD_CHECK_RTOL:
            raise RuntimeError(f"a channel fold changed the FP output (relative error {error:.2e}); a fold is not exact for this model")
    ratios = [v["range_after"] / v["range_before"] for v in summary["layers"].values() if v["range_before"] > 0]
    summary["mean_range_ratio"] = round(sum(ratios) / len(ratios), 4) if ratios else 1.0
    unet.train(was_training)
    return summary


def dilate_unet(unet: nn.Module, calib: CalibrationSet, check: bool = True) -> dict[str, Any]:
    """DilateQuant: fold factors ``s_j >= 1`` that keep every consumer row's weight range."""
    return fold_channel_factors(
        unet, calib, lambda fold: dilation_factors(fold.amax, headroom([c.weight for c in fold.consumers.values()])), check
    )


def smoothing_factors(amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = amax_j^alpha / wmax_j^(1 - alpha)``: activation outliers move into the
    weights by the balance ``alpha``; channels that never fire or have no weight keep ``s_j = 1``."""
    amax, weight_amax = amax.float(), weight_amax.float()
    live = (amax > 0) & (weight_amax > 0)
    s = amax.clamp_min(1e-30).pow(alpha) / weight_amax.clamp_min(1e-30).pow(1.0 - alpha)
    return torch.where(live, s.clamp(1e-4, 1e4), torch.ones_like(s))


def smooth_unet(unet: nn.Module, calib: CalibrationSet, alpha: float, check: bool = True) -> dict[str, Any]:
    """SmoothQuant-style smoothing through the same exact folds as dilation (weights may grow)."""
    return fold_channel_factors(unet, calib, lambda fold: smoothing_factors(fold.amax, consumer_column_amax(fold), alpha), check)
