"""The quantized UNet: conversion, exactness when disabled, profiles, recipes, checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from quest.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from quest.errors import QuantConfigError
from quest.modules import QuantAttnProcessor, QuantConv2d, QuantLinear
from quest.profiles import ONNXRUNTIME, TENSORRT, get_profile
from quest.ptq import calibrate, init_weight_scales
from quest.quantize import quantize_unet, set_quantizers_enabled
from quest.quantizers import WeightQuantizer
from quest.recipe import LayerRule, Recipe, load_recipe, parse_bits
from quest_export.models.digits.unet import build_digits_unet


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return build_digits_unet().eval()


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 1, 16, 16, generator=g), torch.randn(batch, 4, 32, generator=g)


def _loop(unet_module) -> None:
    x, e = _inputs(4)
    for t in (900, 500, 100):
        unet_module(x, t, encoder_hidden_states=e)


def test_every_conv_linear_and_attention_is_quantized(unet) -> None:
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in unet.modules())
    q = quantize_unet(unet, Recipe(weight_bits=4, act_bits=8, target="tensorrt"))
    assert sum(isinstance(m, QuantConv2d) for m in unet.modules()) == n_conv
    assert sum(isinstance(m, QuantLinear) for m in unet.modules()) == n_linear
    procs = [m.processor for m in unet.modules() if hasattr(m, "processor")]
    assert procs and all(isinstance(p, QuantAttnProcessor) for p in procs)
    assert type(unet).__name__ == "UNet2DConditionModel"
    assert {i.kind for i in q.layers.values()} == {"conv", "linear", "attention"}


def test_disabled_quantizers_reproduce_the_fp_model(unet) -> None:
    x, e = _inputs()
    ref = unet(x, 300, encoder_hidden_states=e).sample
    q = quantize_unet(unet, Recipe(target="onnxruntime", timestep_groups=4))
    set_quantizers_enabled(q, False)
    assert torch.allclose(unet(x, 300, encoder_hidden_states=e).sample, ref, atol=1e-5)


def test_profiles_choose_the_arithmetic(unet) -> None:
    q_trt = quantize_unet(copy.deepcopy(unet), Recipe(target="tensorrt"))
    q_ort = quantize_unet(copy.deepcopy(unet), Recipe(target="onnxruntime"))
    trt_conv = q_trt.unet.conv_in
    ort_conv = q_ort.unet.conv_in
    assert trt_conv.input_quantizer.spec.signed and trt_conv.input_quantizer.spec.symmetric
    assert trt_conv.output_quantizer is None  # TensorRT: inputs only
    assert not ort_conv.input_quantizer.spec.signed and ort_conv.output_quantizer is not None  # QLinearConv
    assert q_ort.unet.time_embedding.linear_1.output_quantizer is None  # MatMulIntegerToFloat
    assert trt_conv.weight_quantizer.spec.narrow and trt_conv.weight_quantizer.spec.qmax == 127


def test_profiles_refuse_what_their_engine_cannot_run(unet) -> None:
    with pytest.raises(QuantConfigError, match="per tensor only"):
        quantize_unet(unet, Recipe(target="tensorrt", activation_per_channel=True))
    with pytest.raises(QuantConfigError, match="symmetric"):
        quantize_unet(unet, Recipe(target="tensorrt", activation_symmetric=False))
    with pytest.raises(QuantConfigError, match="uint8"):
        quantize_unet(unet, Recipe(target="onnxruntime", activation_symmetric=True))
    with pytest.raises(QuantConfigError, match="cannot run 9-bit"):
        TENSORRT.weight_spec(9)
    with pytest.raises(QuantConfigError, match="unknown target"):
        get_profile("coreml")


def test_recipe_rules_keep_layers_at_higher_precision_or_fp(unet) -> None:
    recipe = Recipe(
        weight_bits=4,
        act_bits=4,
        layers=[LayerRule("conv_in", weight_bits=8, act_bits=8), LayerRule("conv_out", quantize=False)],
    )
    q = quantize_unet(copy.deepcopy(unet), recipe, TENSORRT)
    assert q.layers["conv_in"].weight_bits == 8 and q.layers["conv_in"].act_bits == 8
    assert "conv_out" not in q.layers and type(q.unet.conv_out) is torch.nn.Conv2d
    assert q.layers["down_blocks.0.resnets.0.conv1"].weight_bits == 4
    # the onnxruntime target grants at most its 7-bit weight grid (exact on non-VNNI x86 kernels)
    q = quantize_unet(unet, recipe, ONNXRUNTIME)
    assert q.layers["conv_in"].weight_bits == 7 and q.layers["conv_in"].act_bits == 8
    assert q.layers["down_blocks.0.resnets.0.conv1"].weight_bits == 4


def test_recipe_naming_no_layer_is_refused(unet) -> None:
    with pytest.raises(QuantConfigError, match="match no layer"):
        quantize_unet(unet, Recipe(layers=[LayerRule("no_such_layer*", act_bits=8)]))


@pytest.mark.parametrize("bits", ["w9a8", "4", "w4", "a8w4", "w1a8"])
def test_bad_bits(bits: str) -> None:
    with pytest.raises(QuantConfigError):
        parse_bits(bits)


def test_default_recipe_file_is_picked_when_present() -> None:
    recipe = load_recipe("digits", "w4a8")
    assert recipe.name == "digits-w4a8" and recipe.weight_bits == 4 and recipe.act_bits == 8
    assert load_recipe("nosuchmodel", "w4a8").name == "default-w4a8"


def test_shortcut_split_uses_two_quantizers_on_channel_halves(unet) -> None:
    q = quantize_unet(unet, Recipe(split_shortcut=True))
    split = {n: i.split_at for n, i in q.layers.items() if i.split_at}
    assert split and all(n.startswith("up_blocks.") and n.endswith("conv_shortcut") for n in split)
    for name, at in split.items():
        conv = unet.get_submodule(name)
        assert 0 < at < conv.in_channels
    x, e = _inputs()
    calibrate(q, _loop)
    assert torch.isfinite(unet(x, 10, encoder_hidden_states=e).sample).all()


def test_mse_weight_search_beats_minmax_at_4_bits() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 64) * torch.linspace(0.5, 2, 16)[:, None]
    weight[0, 0] = 12.0  # an outlier
    mse_q, mm_q = WeightQuantizer(TENSORRT.weight_spec(4), 16), WeightQuantizer(TENSORRT.weight_spec(4), 16)
    init_weight_scales(mse_q, weight, "mse")
    init_weight_scales(mm_q, weight, "minmax")
    assert (mse_q(weight) - weight).pow(2).sum() < (mm_q(weight) - weight).pow(2).sum()


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_activation_init_methods_produce_per_group_tables(unet, method: str) -> None:
    q = quantize_unet(unet, Recipe(target="onnxruntime", timestep_groups=4, activation_init=method))
    calibrate(q, _loop)
    aq = unet.conv_in.input_quantizer
    # calibration saw groups 3 (t=900), 2 (t=500) and 0 (t=100): their scales differ from the init value
    assert (aq.scale.detach()[[0, 2, 3]] != 1.0).all()
    zps = {float(m.zero_point) for _, m in q.activation_quantizers()}
    assert all(0 <= z <= 255 for z in zps)
    x, e = _inputs()
    assert torch.isfinite(unet(x, 500, encoder_hidden_states=e).sample).all()


def test_checkpoint_round_trip_is_exact(unet, tmp_path: Path) -> None:
    fresh = copy.deepcopy(unet)
    q = quantize_unet(unet, Recipe(weight_bits=4, act_bits=8, target="onnxruntime", timestep_groups=3))
    calibrate(q, _loop)
    x, e = _inputs()
    t = torch.tensor([20, 700])
    expected = unet(x, t, encoder_hidden_states=e).sample
    save_checkpoint(tmp_path, q, {"model": {"name": "test", "source": "test", "content_hash": None}, "method": "ptq-timestep"})
    meta = read_checkpoint_meta(tmp_path)
    assert meta["bits"] == "w4a8" and meta["target"] == "onnxruntime" and meta["timestep_grid"]["num_groups"] == 3
    assert meta["layers"]["conv_in"]["weight_bits"] == 4
    restored = load_checkpoint(tmp_path, fresh, meta)
    assert torch.equal(restored.unet(x, t, encoder_hidden_states=e).sample, expected)


def test_checkpoint_with_edited_tensors_is_refused(unet, tmp_path: Path) -> None:
    q = quantize_unet(unet, Recipe())
    save_checkpoint(tmp_path, q, {"model": {"name": "t", "source": "t", "content_hash": None}, "method": "ptq"})
    data = bytearray((tmp_path / "quant.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "quant.safetensors").write_bytes(bytes(data))
    with pytest.raises(QuantConfigError, match="does not match the hash"):
        read_checkpoint_meta(tmp_path)


def test_checkpoint_of_another_model_is_refused(unet, tmp_path: Path) -> None:
    q = quantize_unet(unet, Recipe())
    save_checkpoint(tmp_path, q, {"model": {"name": "t", "source": "t", "content_hash": None}, "method": "ptq"})
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4,
    )
    with pytest.raises(QuantConfigError, match="does not fit this model"):
        load_checkpoint(tmp_path, other)
