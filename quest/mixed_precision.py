"""Mixed-precision activations (MixDQ-style): the few layers whose low-bit activations hurt most
keep 8-bit activations.

Each quantized layer's activation quantizers are switched on alone (weights and every other
quantizer bypassed, PTQ scales at the recipe's activation width) and the UNet's output error
against the FP model over a stratified slice of the calibration set ranks the layers. The worst
``act8_layers`` are recorded in the recipe (``act8_selected``), so the checkpoint, the exporter and
a resumed run all build the same layer map without measuring again.

On both engine targets sub-8-bit activations already run in 8-bit containers (INT8 Q/DQ), so an
8-bit layer costs no engine size or latency there; on hardware with true 4-bit activation kernels
those layers would run at the 8-bit rate, which is why the report states their share of the
UNet's multiply-accumulates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quest.calibration import CalibrationSet
from quest.quantize import QuantizedUNet, set_quantizers_enabled
from quest.quantizers import ActivationQuantizer, TiedOutputQuantizer
from quest.sensitivity import isolated_measurement, output_error, quantizer_prefix


def _low_bit_activation_quantizers(qunet: QuantizedUNet, layer: str) -> list[nn.Module]:
    """The layer's activation quantizers narrower than 8 bits (what an 8-bit rule would widen)."""
    prefix = quantizer_prefix(qunet, layer)
    return [m for n, m in qunet.unet.named_modules()
            if n.startswith(prefix) and isinstance(m, (ActivationQuantizer, TiedOutputQuantizer)) and m.spec.bits < 8]


@torch.no_grad()
def activation_sensitivity(qunet: QuantizedUNet, calib: CalibrationSet, max_rows: int = 128, batch_size: int = 64) -> list[dict[str, Any]]:
    """Output MSE vs FP with only one layer's low-bit activation quantizers on, per layer; worst first.

    ``qunet`` must be calibrated. Enabled flags and train/eval mode are restored exactly.
    """
    with isolated_measurement(qunet, calib, max_rows, batch_size) as (calib, reference):
        results = []
        for layer in qunet.layers:
            quantizers = _low_bit_activation_quantizers(qunet, layer)
            if not quantizers:
                continue
            set_quantizers_enabled(qunet, False)
            for quantizer in quantizers:
                quantizer.enabled = True
            if any(isinstance(q, TiedOutputQuantizer) for q in quantizers):
                qunet.unet.get_submodule(f"{layer}.input_quantizer").enabled = True  # a tied output follows its input
            mse, _ = output_error(qunet, calib, reference, batch_size)
            results.append({"layer": layer, "kind": qunet.layers[layer].kind, "mse": mse})
    return sorted(results, key=lambda r: r["mse"], reverse=True)


@torch.no_grad()
def layer_macs(unet: nn.Module, calib: CalibrationSet) -> dict[str, int]:
    """Multiply-accumulates per sample of every Conv2d / Linear and attention matmul pair, from one
    forward pass on one calibration row (module name -> MACs)."""
    from diffusers.models.attention_processor import Attention

    macs: dict[str, int] = {}
    handles = []

    def count(name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        out = output if isinstance(output, torch.Tensor) else output[0]
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs[name] = macs.get(name, 0) + out[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            macs[name] = macs.get(name, 0) + out[0].numel() * module.in_features
        elif isinstance(module, Attention):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            queries = hidden[0, 0].numel() if hidden.dim() == 4 else hidden.shape[1]  # (B, C, H, W) or (B, S, C)
            keys = queries if context is None else context.shape[1]
            macs[name] = macs.get(name, 0) + 2 * queries * keys * module.to_q.out_features  # q @ k^T and probs @ v

    for name, module in unet.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, Attention)):
            handles.append(module.register_forward_hook(lambda m, a, k, o, n=name: count(n, m, a, k, o), with_kwargs=True))
    try:
        x, t, states = next(calib.batches(1))
        param = next(unet.parameters())
        unet(x.to(param.device, param.dtype), t.to(param.device), encoder_hidden_states=states.to(param.device, param.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return macs


def select_act8_layers(ranking: list[dict[str, Any]], count: int) -> list[str]:
    """The ``count`` layers at the top of an :func:`activation_sensitivity` ranking."""
    return [entry["layer"] for entry in ranking[:count]]


def mixed_precision_report(ranking: list[dict[str, Any]], selected: list[str], macs: dict[str, int]) -> dict[str, Any]:
    """What the selection keeps at 8 bits and what it would cost on true 4-bit activation kernels."""
    total = sum(macs.values()) or 1
    chosen = sum(macs.get(name, 0) for name in selected)
    return {
        "act8_layers": selected,
        "act8_mac_fraction": round(chosen / total, 4),
        "ranked_layers": len(ranking),
        "ranking_top": [{"layer": r["layer"], "mse": r["mse"]} for r in ranking[: max(2 * len(selected), 10)]],
    }
