"""NVIDIA ModelOpt's own PTQ, converted into a quest checkpoint.

ModelOpt runs its INT8 config (or, at other widths, the same layout with INT4/other per-channel
weights) with its own ``max`` calibrator over our calibration forward loop. Its calibrated amax
values are then written into quest's quantizers on the TensorRT profile, whose arithmetic is the
same (symmetric, ``scale = amax / qmax``, round half to even; the FP16 engine graph holds that
scale in FP16, for ModelOpt's export and ours alike), so the baseline is evaluated and exported by
exactly the code paths our methods use. Layers ModelOpt leaves unquantized (attention
matmuls, ``proj_out``) stay unquantized; its LayerNorm input quantizers are switched off so that
every method is compared on the same Conv/Linear-input layout.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from quest.modules import QuantConv2d, QuantLinear
from quest.profiles import TENSORRT
from quest.quantize import QuantizedUNet, quantize_unet
from quest.recipe import LayerRule, Recipe

MODELOPT_TARGET = TENSORRT.name  # ModelOpt INT8 PTQ is symmetric with constant scales: TensorRT's arithmetic


def modelopt_config(recipe: Recipe) -> dict:
    """ModelOpt quant config: INT8_DEFAULT_CFG at W8A8, the same layout at other bit-widths."""
    import modelopt.torch.quantization as mtq

    if recipe.weight_bits == 8 and recipe.act_bits == 8:
        config = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    else:
        config = {
            "quant_cfg": [
                {"quantizer_name": "*", "enable": False},
                {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": recipe.weight_bits, "axis": 0}},
                {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": recipe.act_bits, "axis": None}},
                # ModelOpt's presets leave these unquantized; keep its defaults
                {"quantizer_name": "*proj_out.*", "enable": False},
            ],
            "algorithm": "max",
        }
    # ModelOpt also puts Q/DQ in front of LayerNorm; TensorRT's integer kernels are the Conv/MatMul
    # inputs, and that is the layout every method here is compared on
    config["quant_cfg"].append({"parent_class": "nn.LayerNorm", "quantizer_name": "*", "enable": False})
    for rule in recipe.layers:
        if not rule.quantize:
            config["quant_cfg"].append({"quantizer_name": f"{rule.pattern}.*", "enable": False})
            continue
        if rule.weight_bits:
            config["quant_cfg"].append({"quantizer_name": f"{rule.pattern}.weight_quantizer", "cfg": {"num_bits": rule.weight_bits, "axis": 0}})
        if rule.act_bits:
            config["quant_cfg"].append({"quantizer_name": f"{rule.pattern}.input_quantizer", "cfg": {"num_bits": rule.act_bits, "axis": None}})
    return config


def run_modelopt(unet: nn.Module, recipe: Recipe, forward_loop: Callable[[nn.Module], None]) -> nn.Module:
    """ModelOpt PTQ on a copy of ``unet``; returns the fake-quantized copy."""
    import modelopt.torch.quantization as mtq

    work = copy.deepcopy(unet).eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        with torch.no_grad():
            mtq.quantize(work, modelopt_config(recipe), forward_loop)
    return work


def _enabled(quantizer: nn.Module | None) -> bool:
    return quantizer is not None and bool(getattr(quantizer, "is_enabled", False))


def convert_to_quest(unet: nn.Module, modelopt_unet: nn.Module, recipe: Recipe) -> QuantizedUNet:
    """Quantize ``unet`` in place on the TensorRT profile with ModelOpt's calibrated ranges."""
    rules = list(recipe.layers)
    for name, module in modelopt_unet.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not _enabled(getattr(module, "input_quantizer", None)):
            if type(unet.get_submodule(name)) in (nn.Conv2d, nn.Linear):
                rules.append(LayerRule(pattern=name, quantize=False))
    converted = replace(recipe, name=f"{recipe.name}+modelopt", target=MODELOPT_TARGET, timestep_groups=1, quantize_attention=False, layers=rules)
    qunet = quantize_unet(unet, converted, TENSORRT)
    with torch.no_grad():
        for name, module in qunet.unet.named_modules():
            if not isinstance(module, (QuantConv2d, QuantLinear)):
                continue
            source = modelopt_unet.get_submodule(name)
            w_amax = source.weight_quantizer.amax.detach().float().reshape(-1)
            a_amax = source.input_quantizer.amax.detach().float().reshape(())
            wq, aq = module.weight_quantizer, module.input_quantizer
            wq.scale.copy_((w_amax / wq.spec.qmax).clamp_min(1e-12).expand_as(wq.scale))
            aq.scale.copy_((a_amax / aq.spec.qmax).clamp_min(1e-12).expand_as(aq.scale))
    return qunet
