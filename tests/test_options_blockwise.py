"""Block-wise distillation: the finetuner's alternative loss trains every block, and the CLI wires
the issue-8 options (refusing combinations that make no sense with one line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error
from quest.blockwise import unet_blocks
from quest.errors import QuantConfigError
from quest.finetune import QuestFinetuner, settings_from_recipe
from test_finetune import quantized_pair

DIGITS_STAGES = {"stages": [{"name": "temporal", "steps": 100, "batch_size": 32}, {"name": "critical", "steps": 200}]}


def test_blockwise_settings_replace_the_quest_stages() -> None:
    settings = settings_from_recipe({"loss": "blockwise", **DIGITS_STAGES}, class_conditional=True)
    assert settings.loss == "blockwise" and [s.name for s in settings.stages] == ["blockwise"]
    stage = settings.stages[0]
    assert stage.weights == ["*"] and stage.scales == ["*"] and stage.steps == 300 and stage.weight_lr == 1e-5
    assert settings.fingerprint() != settings_from_recipe(DIGITS_STAGES, class_conditional=True).fingerprint()
    with pytest.raises(QuantConfigError, match="finetune.loss"):
        settings_from_recipe({"loss": "kd"}, class_conditional=True)


def test_blockwise_loss_trains_every_block() -> None:
    qunet, fp, calib = quantized_pair()
    assert unet_blocks(qunet.unet)[:3] == ["conv_in", "time_embedding", "down_blocks.0"] and "mid_block" in unet_blocks(qunet.unet)
    settings = settings_from_recipe({"loss": "blockwise", "seed": 3}, class_conditional=True)
    settings.stages[0].steps, settings.stages[0].batch_size = 8, 4
    settings.stages[0].weight_lr = settings.stages[0].scale_lr = 3e-4
    before = {k: v.clone() for k, v in qunet.unet.state_dict().items()}
    log = QuestFinetuner(qunet, fp, calib, settings).run()
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])
    after = qunet.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # unlike QuEST's stages, every block's weights train (ResNet convs included), weight scales stay frozen
    for key in ("conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "mid_block.attentions.0.proj_out.weight", "conv_out.weight"):
        assert key in changed, key
    assert not any("weight_quantizer" in k for k in changed)


def test_cli_refuses_option_misuse(run_cli, tmp_path: Path) -> None:
    from quest.recipe import load_recipe
    from quest_export.cli import _apply_option_flags
    from quest_export.errors import UserError

    recipe = load_recipe("digits", "w4a4")
    for args, message in (
        (("ptq", None, None, "blockwise", None), "--loss applies only"),
        (("quest", "random", None, None, None), "--grouping"),
        (("modelopt", "searched", None, None, None), "searched needs"),
        (("quest", None, None, None, "some"), "--calibration-steps"),
    ):
        with pytest.raises(UserError, match=message):
            _apply_option_flags(recipe, *args)
    changed = _apply_option_flags(recipe, "quest", "searched", True, "blockwise", "selected")
    assert (changed.grouping, changed.weight_dilation, changed.finetune.loss, changed.calibration.step_selection) == ("searched", True, "blockwise", "selected")
    assert recipe.grouping == "uniform" and recipe.finetune.loss == "quest"  # the loaded recipe is untouched
    assert_one_line_error(run_cli("finetune", "--method", "ptq", "--loss", "blockwise", "--out", tmp_path / "ckpt"), contains="--loss applies only")


@pytest.mark.slow  # ~30 s (CI budget); each option runs by default through the CLI in its own test file
def test_cli_runs_all_options_together(run_cli, tmp_path: Path) -> None:
    """Tiny sizes: a selected calibration set, searched groups, dilation and block-wise distillation."""
    calib = tmp_path / "calib"
    result = run_cli("calibrate", "--trajectories", "4", "--steps", "5", "--calibration-steps", "selected", "--out", calib)
    assert result.returncode == 0, result.stderr
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "target: tensorrt\ntimestep_groups: 3\ngrouping_search: {steps: 2, batch_size: 4}\n"
        "finetune: {stages: [{name: blockwise, steps: 2, batch_size: 4}]}\n"
    )
    ckpt = tmp_path / "ckpt"
    uniform_calib_args = ("--calibration", calib, "--calibration-steps", "uniform")
    assert_one_line_error(run_cli("finetune", "--recipe", recipe, *uniform_calib_args, "--out", ckpt), contains="recorded with --calibration-steps selected")
    result = run_cli(
        "finetune", "--bits", "w4a8", "--recipe", recipe, "--grouping", "searched", "--weight-dilation", "--loss", "blockwise",
        "--calibration", calib, "--calibration-steps", "selected", "--out", ckpt,
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads((ckpt / "quant.json").read_text())
    assert meta["recipe"]["grouping"] == "searched" and meta["recipe"]["weight_dilation"] is True
    assert meta["recipe"]["finetune"]["loss"] == "blockwise" and meta["timings"]["stages"] == ["blockwise"]
    assert meta["calibration"]["step_selection"] == "selected"
    assert meta["timestep_grid"]["num_groups"] == 3 and "grouping_search" in meta["options"] and "weight_dilation" in meta["options"]
    out = tmp_path / "eval.json"
    result = run_cli("eval", "--checkpoint", ckpt, "--num-samples", "10", "--steps", "5", "--json", out)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["psnr_vs_fp"] > 10
