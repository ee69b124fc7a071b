"""Quantizer arithmetic against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from quest.profiles import ONNXRUNTIME, TENSORRT, QuantSpec
from quest.quantizers import ActivationQuantizer, TiedOutputQuantizer, WeightQuantizer, fake_quant, quantize_codes
from quest.timesteps import TimestepContext, uniform_group_lookup


def test_integer_grids() -> None:
    assert (QuantSpec(8, True, True).qmin, QuantSpec(8, True, True).qmax) == (-128, 127)
    assert (QuantSpec(8, True, True, narrow=True).qmin, QuantSpec(8, True, True, narrow=True).qmax) == (-127, 127)
    assert (QuantSpec(4, True, True, narrow=True).qmin, QuantSpec(4, True, True, narrow=True).qmax) == (-7, 7)
    assert (QuantSpec(8, False, False).qmin, QuantSpec(8, False, False).qmax) == (0, 255)
    assert (QuantSpec(4, False, False).qmin, QuantSpec(4, False, False).qmax) == (0, 15)


def test_rounding_is_half_to_even_like_quantize_linear() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    codes = quantize_codes(x, torch.tensor(1.0), torch.tensor(0.0), -128, 127)
    assert codes.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0]


def test_clamping_and_zero_point() -> None:
    # scale 0.1, zero point 10, uint4 grid [0, 15]: representable [-1.0, 0.5]
    x = torch.tensor([-5.0, -1.0, -0.04, 0.0, 0.26, 0.5, 3.0])
    out = fake_quant(x, torch.tensor(0.1), torch.tensor(10.0), 0, 15)
    assert torch.allclose(out, torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.3, 0.5, 0.5]), atol=1e-6)


def test_weight_quantizer_per_output_channel() -> None:
    spec = TENSORRT.weight_spec(4)  # narrow signed: [-7, 7]
    wq = WeightQuantizer(spec, num_channels=2)
    wq.scale.data = torch.tensor([1.0, 0.5])
    weight = torch.tensor([[[[3.4]], [[-9.0]]], [[[1.2]], [[0.74]]]])  # (out=2, in=2, 1, 1)
    expected = torch.tensor([[[[3.0]], [[-7.0]]], [[[1.0]], [[0.5]]]])
    assert torch.equal(wq(weight), expected)
    assert wq.codes(weight).flatten().tolist() == [3.0, -7.0, 2.0, 1.0]


def test_activation_quantizer_selects_scale_per_timestep_group_per_sample() -> None:
    context = TimestepContext(uniform_group_lookup(2, 1000))  # t < 500 -> group 0, else 1
    aq = ActivationQuantizer(TENSORRT.activation_spec(8), num_groups=2, context=context)
    aq.scale.data = torch.tensor([0.5, 2.0])
    x = torch.full((2, 3), 3.3)
    context.set(torch.tensor([10, 900]), batch=2)
    out = aq(x)
    assert torch.allclose(out[0], torch.full((3,), 3.5)) and torch.allclose(out[1], torch.full((3,), 4.0))
    context.set(999, batch=2)  # scalar timestep applies to the whole batch
    assert torch.allclose(aq(x), torch.full((2, 3), 4.0))


def test_per_timestep_quantizer_repeats_groups_over_heads() -> None:
    context = TimestepContext(uniform_group_lookup(2, 1000))
    aq = ActivationQuantizer(TENSORRT.activation_spec(8), num_groups=2, context=context)
    aq.scale.data = torch.tensor([1.0, 10.0])
    context.set(torch.tensor([0, 999]), batch=2)
    out = aq(torch.full((4, 1), 14.0))  # batch * heads (2 heads)
    # group 1's scale is 10 as the FP16 graph holds it (s0 / f of FP16 numbers): 10 within 2^-10
    assert torch.allclose(out.flatten(), torch.tensor([14.0, 14.0, 10.0, 10.0]), rtol=2**-10)
    assert out[2].item() != 10.0


def test_per_timestep_quantizer_without_timestep_is_an_error() -> None:
    aq = ActivationQuantizer(TENSORRT.activation_spec(8), num_groups=2, context=TimestepContext(uniform_group_lookup(2)))
    with pytest.raises(RuntimeError, match="without a timestep"):
        aq(torch.ones(1, 2))


@pytest.mark.parametrize("profile", [ONNXRUNTIME, TENSORRT])
def test_lsq_gradient_reaches_the_scale(profile) -> None:
    """Also through the FP16 rounding of the tensorrt scales (straight through)."""
    aq = ActivationQuantizer(profile.activation_spec(8), num_groups=2, context=TimestepContext(uniform_group_lookup(2)))
    aq.train()
    aq.scale.data = torch.tensor([0.1, 0.3])
    aq._context.set(torch.tensor([0, 999]), batch=2)
    x = torch.linspace(-1, 40, 100).view(2, 50)
    aq(x).sum().backward()
    assert aq.scale.grad is not None and bool((aq.scale.grad.abs() > 0).all())


def test_tied_output_quantizer_scale_is_ratio_times_input_table() -> None:
    context = TimestepContext(uniform_group_lookup(2, 1000))
    aq = ActivationQuantizer(ONNXRUNTIME.activation_spec(8), num_groups=2, context=context)
    aq.scale.data = torch.tensor([0.1, 0.4])
    out_q = TiedOutputQuantizer(ONNXRUNTIME.activation_spec(8), aq)
    out_q.log_ratio.data = torch.log(torch.tensor(2.0))
    context.set(torch.tensor([0, 999]), batch=2)
    y = torch.full((2, 1), 1.0)
    # group 0: scale 0.2 -> 1.0 exactly; group 1: scale 0.8 -> round(1.25) = 1 -> 0.8
    assert torch.allclose(out_q(y).flatten(), torch.tensor([1.0, 0.8]))


def test_uniform_lookup_covers_every_timestep() -> None:
    lookup = uniform_group_lookup(10, 1000)
    assert lookup.shape == (1000,) and lookup.min() == 0 and lookup.max() == 9
    assert (lookup[1:] >= lookup[:-1]).all()
    assert torch.bincount(lookup).tolist() == [100] * 10


def _composite_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The textbook chain of ops (STE rounding as a detached difference) the one-node version replaces."""
    scaled = x / scale
    q = torch.clamp((torch.round(scaled) - scaled).detach() + scaled + zero_point, qmin, qmax)
    return (q - zero_point) * scale


@pytest.mark.parametrize("zero_point,qmin,qmax", [(0.0, -128, 127), (3.0, 0, 15), (0.0, -7, 7)])
def test_one_node_fake_quant_matches_the_composite_ops_in_values_and_gradients(zero_point: float, qmin: int, qmax: int) -> None:
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 7) * 8).requires_grad_()
    scale = torch.tensor([0.1, 0.3, 0.05]).view(3, 1, 1).requires_grad_()  # per-sample scales, broadcast
    zp = torch.tensor(zero_point)
    weights = torch.randn(3, 5, 7)
    ours = fake_quant(x, scale, zp, qmin, qmax)
    (ours * weights).sum().backward()
    ours_grads = x.grad.clone(), scale.grad.clone()
    x.grad = scale.grad = None
    reference = _composite_fake_quant(x, scale, zp, qmin, qmax)
    (reference * weights).sum().backward()
    assert torch.equal(ours, reference)  # forward: bit-identical, the exporter's arithmetic
    assert torch.allclose(ours_grads[0], x.grad, rtol=1e-6, atol=1e-7)
    assert torch.allclose(ours_grads[1], scale.grad, rtol=1e-5, atol=1e-6)
    assert (ours_grads[0] == 0).any() and (ours_grads[0] != 0).any()  # both clamped and passed elements


def test_fake_quant_keeps_no_full_size_intermediates_for_backward() -> None:
    x = torch.randn(4, 64, 64, requires_grad=True)
    scale = torch.tensor(0.02, requires_grad=True)
    out = fake_quant(x.softmax(-1), scale, torch.tensor(0.0), -128, 127)
    saved = [t for t in out.grad_fn.saved_tensors if t.numel() == x.numel()]
    assert len(saved) == 1  # only the input, which softmax keeps anyway


def test_fp16_graph_scales_never_reach_zero() -> None:
    """A scale below FP16's range (a calibration of an all-zero input, or a learning-rate step past
    zero) would be a zero Q scale in the FP16 graph: the graph's FP16 conversion and the simulation
    both clamp it to 1e-7, and finetuning keeps the learned scale at or above that floor."""
    from quest.finetune import StageSpec, plan_stage
    from quest.quantizers import FP16_SCALE_MIN, SCALE_FLOOR, graph_scale_table

    tiny = torch.tensor([1e-8, 3e-3])
    s0, factors, effective = graph_scale_table(tiny, "fp16")
    assert bool(torch.isfinite(factors).all()) and float(effective.min()) >= FP16_SCALE_MIN * (1 - 2**-10)
    assert float(graph_scale_table(tiny[:1], "fp16")[0]) == float(torch.tensor(FP16_SCALE_MIN).half().float()) > 0
    wq = WeightQuantizer(TENSORRT.weight_spec(4), 2)
    wq.scale.data = torch.tensor([1e-9, 0.1])
    assert bool((wq.graph_scale() > 0).all())
    aq = ActivationQuantizer(TENSORRT.activation_spec(8), num_groups=2, context=TimestepContext(uniform_group_lookup(2)))
    aq.scale.data = tiny.clone()
    aq._context.set(torch.tensor([0, 999]), batch=2)
    assert bool(torch.isfinite(aq(torch.randn(2, 8))).all())

    unet = torch.nn.Module()
    unet.add_module("q", aq)
    plan = plan_stage(unet, StageSpec(name="s", weights=[], scales=["q"], steps=1))
    aq.scale.data = torch.tensor([-1.0, 3e-3])
    plan.clamp_scales()
    assert aq.scale.data.tolist() == pytest.approx([SCALE_FLOOR["fp16"], 3e-3])
