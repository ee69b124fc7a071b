"""The x86 integer-kernel arithmetic that differs between CPU classes, in numpy, and why the
``onnxruntime`` profile's weights cannot reach it.

ONNX Runtime's U8S8 GEMM/conv kernels on x86 without VNNI (AVX2-only, AVX-512 without VNNI)
multiply uint8 activations by int8 weights with VPMADDUBSW, which adds each *pair* of adjacent
products into a signed 16-bit lane **with saturation**, before widening to int32. VNNI (VPDPBUSD)
and AMX accumulate in int32 directly. Measured (digits W4A8 demo, 8-bit conv_in/conv_out weights):
77% of conv_in's output codes agreed on an AVX2-only host, engine 24 dB from the simulation.
These tests hold on any host: they model the arithmetic instead of depending on the CPU.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from quest.profiles import ONNXRUNTIME, TENSORRT
from quest.quantize import quantize_unet
from quest.recipe import load_recipe

INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1


def vpmaddubsw_dot(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a (M, K) uint8 @ w (K, N) int8`` as the non-VNNI kernels compute it: adjacent pairs of
    u8*s8 products summed and saturated to int16, then accumulated in int32."""
    k = a.shape[1]
    if k % 2:
        a = np.pad(a, ((0, 0), (0, 1)))
        w = np.pad(w, ((0, 1), (0, 0)))
    prod = a.astype(np.int32)[:, :, None] * w.astype(np.int32)[None, :, :]  # (M, K, N)
    pairs = prod[:, 0::2, :] + prod[:, 1::2, :]
    return np.clip(pairs, INT16_MIN, INT16_MAX).sum(axis=1)


def exact_dot(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    return a.astype(np.int64) @ w.astype(np.int64)


def test_eight_bit_weights_saturate_the_pair_sums() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(180, 256, size=(16, 64)).astype(np.uint8)  # bright activations (uint8 codes)
    w = rng.integers(-127, 128, size=(64, 32)).astype(np.int8)  # a full 8-bit weight grid
    got, want = vpmaddubsw_dot(a, w), exact_dot(a, w)
    assert (got != want).mean() > 0.05  # the effect measured on the AVX2 host: many outputs differ
    # one pair alone: 255*127 + 255*127 = 64770 does not fit in int16
    assert vpmaddubsw_dot(np.array([[255, 255]], np.uint8), np.array([[127], [127]], np.int8))[0, 0] == INT16_MAX


@pytest.mark.parametrize("bits", range(2, 9))
def test_onnxruntime_weight_grids_cannot_saturate(bits: int) -> None:
    spec = ONNXRUNTIME.weight_spec(bits)
    assert spec.qmax <= 63 and spec.qmin >= -63 and spec.bits == min(bits, 7)
    # the worst pair on that grid fits, in both directions
    assert 2 * 255 * spec.qmax <= INT16_MAX and 2 * 255 * spec.qmin >= INT16_MIN
    rng = np.random.default_rng(bits)
    a = np.concatenate([np.full((1, 64), 255, np.uint8), rng.integers(0, 256, size=(15, 64)).astype(np.uint8)])
    corners = np.array([spec.qmin, spec.qmax], np.int8)
    w = np.concatenate([np.full((64, 1), spec.qmax, np.int8), np.full((64, 1), spec.qmin, np.int8),
                        rng.choice(corners, size=(64, 14)).astype(np.int8)], axis=1)
    assert np.array_equal(vpmaddubsw_dot(a, w), exact_dot(a, w))


def test_tensorrt_keeps_the_full_eight_bit_grid() -> None:
    """TensorRT's GPU kernels accumulate in int32: its profile needs no narrower grid."""
    assert TENSORRT.weight_spec(8).qmax == 127


@pytest.mark.parametrize("bits", ["w8a8", "w4a8", "w4a4"])
def test_every_layer_of_the_digits_recipes_stays_exact_on_non_vnni_kernels(bits: str) -> None:
    """Quantize the shipped digits UNet with its recipe on the onnxruntime target (weight ranges by
    the PTQ search): every weight code of every layer, conv_in/conv_out included (8-bit in the
    recipe), keeps the pair sums exact, and conv_in computes the same integers on both kernel kinds."""
    from quest.ptq import init_weight_scales
    from quest_export.models.resolve import load_model

    unet = load_model("digits").pipeline.unet
    qunet = quantize_unet(unet, replace(load_recipe("digits", bits), target="onnxruntime"), ONNXRUNTIME)
    modules = dict(qunet.unet.named_modules())
    for name, quantizer in qunet.weight_quantizers():
        weight = modules[name.rsplit(".", 1)[0]].weight.detach().float()
        init_weight_scales(quantizer, weight)
        codes = quantizer.codes(weight)
        assert int(codes.abs().max()) <= 63, name
    assert qunet.layers["conv_in"].weight_bits == 7 and qunet.layers["conv_out"].weight_bits == 7
    layer = qunet.unet.conv_in
    codes = layer.weight_quantizer.codes(layer.weight.detach().float()).numpy().astype(np.int8)
    w = codes.reshape(codes.shape[0], -1).T  # (K = C*kh*kw, N = out channels)
    a = np.random.default_rng(0).integers(0, 256, size=(64, w.shape[0])).astype(np.uint8)
    assert np.array_equal(vpmaddubsw_dot(a, w), exact_dot(a, w))
