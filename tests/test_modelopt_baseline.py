"""The ModelOpt baseline: ModelOpt's own PTQ, converted into quest's TensorRT-profile simulation."""

from __future__ import annotations

import copy

import pytest
import torch

from quest.recipe import LayerRule, Recipe
from quest_export.models.digits.unet import build_digits_unet

pytest.importorskip("modelopt.torch.quantization")


def _inputs(batch: int = 4):
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, 1, 16, 16, generator=g), torch.randn(batch, 4, 32, generator=g)


def _loop(unet) -> None:
    x, e = _inputs()
    for t in (900, 400, 50):
        unet(x, t, encoder_hidden_states=e)


def _modelopt_codes(quantizer, x: torch.Tensor) -> torch.Tensor:
    """The integer codes of ModelOpt's quantizer in an FP16 TensorRT graph: round(x / s) on its
    [-2^(b-1), 2^(b-1)-1] grid, with s = amax / qmax held as the FP16 number the graph stores."""
    qmax = 2 ** (quantizer.num_bits - 1) - 1
    scale = (quantizer.amax.float() / qmax).to(torch.float16).float()
    if quantizer.axis is not None:  # per-channel weights: one scale per output channel
        scale = scale.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax)


@pytest.mark.parametrize("bits", [(8, 8), (4, 8)])
def test_converted_modelopt_model_computes_what_modelopt_computes(bits) -> None:
    """Layer by layer, on the inputs ModelOpt's model saw, quest's converted quantizers produce
    the codes of ModelOpt's calibration as the FP16 engine graph computes them."""
    from quest.modules import QuantConv2d, QuantLinear
    from quest_export.baselines.modelopt_ptq import convert_to_quest, run_modelopt

    torch.manual_seed(0)
    unet = build_digits_unet().eval()
    recipe = Recipe(weight_bits=bits[0], act_bits=bits[1], target="tensorrt", layers=[LayerRule("conv_out", weight_bits=8, act_bits=8)])
    mo_unet = run_modelopt(unet, recipe, _loop)
    qunet = convert_to_quest(unet, mo_unet, recipe)
    inputs: dict[str, torch.Tensor] = {}
    for name, module in mo_unet.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, i[0].detach()))
    x, e = _inputs(2)
    with torch.no_grad():
        mo_unet(x, 300, encoder_hidden_states=e)
    compared = 0
    for name, ours in qunet.unet.named_modules():
        if not isinstance(ours, (QuantConv2d, QuantLinear)):
            continue
        theirs = mo_unet.get_submodule(name)
        assert theirs.input_quantizer.is_enabled and theirs.weight_quantizer.is_enabled, name
        a = inputs[name]
        act_agree = (ours.input_quantizer.codes(a) == _modelopt_codes(theirs.input_quantizer, a)).float().mean()
        w_agree = (ours.weight_quantizer.codes(ours.weight) == _modelopt_codes(theirs.weight_quantizer, theirs.weight)).float().mean()
        assert act_agree > 0.999 and w_agree > 0.999, (name, act_agree, w_agree)
        compared += 1
    assert compared == len([i for i in qunet.layers.values() if i.kind != "attention"]) > 100
    # ModelOpt's defaults leave attention matmuls and proj_out unquantized; so does the conversion
    assert not qunet.recipe.quantize_attention
    assert all("proj_out" not in name for name in qunet.layers)
    assert qunet.layers["conv_out"].weight_bits == 8 and qunet.layers["conv_in"].weight_bits == bits[0]
    with torch.no_grad():
        assert torch.isfinite(qunet.unet(x, 300, encoder_hidden_states=e).sample).all()
