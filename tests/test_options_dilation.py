"""Weight dilation: the folds are exact in FP, keep every weight row's range, and survive checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fold_inputs import label_like_calibration, unet_output
from quest.checkpoint import load_checkpoint, save_checkpoint
from quest.dilation import apply_fold, dilate_unet, find_folds, headroom
from quest.ptq import calibrate
from quest.quantize import quantize_unet
from quest.recipe import Recipe
from quest_export.models.resolve import load_model


@pytest.fixture(scope="module")
def digits_unet():
    return load_model("digits").pipeline.unet.eval()


def test_folds_cover_the_transformer_and_skip_inputs_after_silu(digits_unet) -> None:
    folds = find_folds(digits_unet)
    consumers = {c for f in folds for c in f.consumers}
    blocks = [n for n, m in digits_unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(folds) == 7 * len(blocks)  # proj_in norm, norm1/2/3, two to_v, GEGLU value half
    for block in blocks:
        assert {f"{block}.attn1.to_q", f"{block}.attn1.to_k", f"{block}.attn1.to_v", f"{block}.attn2.to_q"} <= consumers
        assert {f"{block}.ff.net.0.proj", f"{block}.ff.net.2", f"{block}.attn1.to_out.0", f"{block}.attn2.to_out.0"} <= consumers
    assert not any(c.endswith(("conv1", "conv2", "time_emb_proj", "conv_shortcut", "proj_out", "attn2.to_k", "attn2.to_v")) for c in consumers)


def test_every_fold_is_output_preserving_in_fp64(digits_unet) -> None:
    """Random factors far larger than dilation would pick: the folds alone must be exact."""
    unet = copy.deepcopy(digits_unet).double()
    calib = label_like_calibration(torch.float64)
    reference = unet_output(unet, calib)
    g = torch.Generator().manual_seed(0)
    for fold in find_folds(unet):
        apply_fold(fold, 1.0 + 3.0 * torch.rand(fold.channels, generator=g, dtype=torch.float64))
    changed = unet_output(unet, calib)
    assert not torch.equal(unet.state_dict()["mid_block.attentions.0.norm.weight"], digits_unet.state_dict()["mid_block.attentions.0.norm.weight"].double())
    assert torch.allclose(changed, reference, rtol=0, atol=1e-11 * reference.abs().max().item())


def test_dilation_keeps_weight_ranges_and_shrinks_activation_ranges(digits_unet) -> None:
    unet = copy.deepcopy(digits_unet).double()
    calib = label_like_calibration(torch.float64)
    reference = unet_output(unet, calib)
    row_max = {n: m.weight.detach().abs().flatten(1).amax(1).clone() for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    summary = dilate_unet(unet, calib)
    assert summary["fold_check_max_rel_error"] < 1e-10
    assert torch.allclose(unet_output(unet, calib), reference, rtol=0, atol=1e-11 * reference.abs().max().item())
    folds = find_folds(unet)
    row_producers = {id(f.producer) for f in folds if f.kind == "rows"}
    for fold in folds:
        for name, consumer in fold.consumers.items():
            after = consumer.weight.detach().abs().flatten(1).amax(1)
            if id(consumer) in row_producers:  # to_v / GEGLU proj: its own rows only shrink
                assert (after <= row_max[name] * (1 + 1e-12)).all()
            else:  # columns grow only inside every row's range
                assert torch.allclose(after, row_max[name], rtol=1e-12)
    layers = summary["layers"].values()
    assert all(v["range_after"] <= v["range_before"] + 1e-9 for v in layers)
    assert any(v["dilated_channels"] > 0 for v in layers)


def test_headroom_is_the_smallest_row_slack() -> None:
    w = torch.tensor([[4.0, 1.0, 2.0], [1.0, 1.0, 0.5]])
    assert torch.allclose(headroom([w]), torch.tensor([1.0, 1.0, 2.0]))


def test_dilated_checkpoint_reloads_to_identical_outputs(digits_unet, tmp_path: Path) -> None:
    unet = copy.deepcopy(digits_unet)
    calib = label_like_calibration()
    dilate_unet(unet, calib)
    q = quantize_unet(unet, Recipe(weight_bits=4, act_bits=8, target="tensorrt", timestep_groups=4, weight_dilation=True))

    def loop(model) -> None:
        with torch.no_grad():
            for x, t, s in calib.batches(4):
                model(x, t, encoder_hidden_states=s)

    calibrate(q, loop)
    expected = unet_output(unet, calib)
    save_checkpoint(tmp_path, q, {"model": {"name": "digits", "source": "digits", "content_hash": None}, "method": "quest"})
    restored = load_checkpoint(tmp_path, copy.deepcopy(digits_unet))  # built from the undilated FP model
    assert torch.equal(unet_output(restored.unet, calib), expected)
