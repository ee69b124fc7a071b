"""QuEST finetuning: stage selection, what trains, loss going down, resume, data parallelism."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path

import pytest
import torch

from quest.calibration import CalibrationSet
from quest.distributed import DistContext
from quest.errors import QuantConfigError
from quest.finetune import FinetuneSettings, QuestFinetuner, StageSpec, StopRequested, plan_stage, settings_from_recipe
from quest.ptq import calibrate
from quest.quantize import quantize_unet
from quest.recipe import Recipe
from quest_export.models.digits.unet import build_digits_unet


def tiny_calibration(rows: int = 8, dtype: torch.dtype = torch.float32) -> CalibrationSet:
    g = torch.Generator().manual_seed(5)
    t = torch.tensor([900, 600, 300, 50]).repeat(rows // 4)
    x, cond, uncond = (torch.randn(shape, generator=g, dtype=dtype) for shape in ((rows, 1, 16, 16), (rows, 4, 32), (rows, 4, 32)))
    return CalibrationSet(x, t, cond, uncond)


def quantized_pair(groups: int = 2, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    unet = build_digits_unet().eval().to(dtype)
    fp = copy.deepcopy(unet)
    qunet = quantize_unet(unet, Recipe(weight_bits=4, act_bits=8, target="tensorrt", timestep_groups=groups))
    unet.to(dtype)  # quantizer parameters too
    calib = tiny_calibration(dtype=dtype)

    def loop(model) -> None:
        with torch.no_grad():
            for x, t, s in calib.batches(4):
                model(x, t, encoder_hidden_states=s)

    calibrate(qunet, loop)
    return qunet, fp, calib


def fast_settings(steps: int = 4, lr: float = 1e-3) -> FinetuneSettings:
    stages = settings_from_recipe({}, class_conditional=True).stages
    for stage in stages:
        stage.steps, stage.batch_size, stage.weight_lr, stage.scale_lr = steps, 4, lr, lr
    return FinetuneSettings(stages=stages, seed=3, checkpoint_every=2)


def test_default_stages_follow_quest() -> None:
    cond = settings_from_recipe({}, class_conditional=True)
    uncond = settings_from_recipe({}, class_conditional=False)
    assert [s.name for s in cond.stages] == ["temporal", "critical"]
    assert cond.stages[0].weights == ["*time_emb_proj"] and cond.stages[0].weight_lr == 1e-5 and cond.stages[0].scale_lr == 1e-4
    assert "*attn1.to_k" in cond.stages[1].weights and "*attn1.to_k" not in uncond.stages[1].weights
    assert uncond.stages[1].weights == ["*ff.net.*"]
    only = settings_from_recipe({"only": ["critical"], "stages": [{"name": "critical", "steps": 7}]}, True)
    assert [s.name for s in only.stages] == ["critical"] and only.stages[0].steps == 7
    with pytest.raises(QuantConfigError, match="unknown stages"):
        settings_from_recipe({"only": ["nope"]}, True)


def test_recipe_blocks_are_typed_when_the_recipe_loads_and_survive_a_checkpoint_round_trip() -> None:
    from quest.recipe_blocks import FinetuneBlock, GroupingSearch, StageOverride

    recipe = Recipe.from_dict({"bits": "w4a8", "finetune": {"seed": 3, "stages": [{"name": "critical", "steps": 7}]},
                               "grouping_search": {"steps": 5}})
    assert isinstance(recipe.finetune, FinetuneBlock) and isinstance(recipe.grouping_search, GroupingSearch)
    assert recipe.finetune.stages == [StageOverride("critical", steps=7)] and recipe.grouping_search.steps == 5
    assert Recipe.from_dict(recipe.to_dict()) == recipe  # the checkpoint's JSON form reads back the same
    settings = recipe.finetune.settings(class_conditional=True)
    assert settings.seed == 3 and [s.steps for s in settings.stages] == [200, 7]
    assert recipe.grouping_search.with_seed(settings.seed).seed == 3  # the search follows the finetune seed
    for bad, message in (({"finetune": {"stages": [{"name": "critical", "stepz": 1}]}}, "stepz"),
                         ({"finetune": {"only": ["nope"]}}, "unknown stages"),
                         ({"finetune": {"sed": 1}}, "unknown keys: sed")):
        with pytest.raises(QuantConfigError, match=message):
            Recipe.from_dict({"bits": "w4a8", **bad})


def test_stage_plans_train_exactly_the_selected_tensors() -> None:
    qunet, _, _ = quantized_pair()
    temporal, critical = settings_from_recipe({}, class_conditional=True).stages
    p1 = plan_stage(qunet.unet, temporal)
    assert p1.layers and all(n.endswith("time_emb_proj") for n in p1.layers)
    assert {n for n, _ in p1.scales} == {f"{n}.input_quantizer.scale" for n in p1.layers}
    p2 = plan_stage(qunet.unet, critical)
    assert any(".ff.net." in n for n in p2.layers) and any(n.endswith("attn1.to_k") for n in p2.layers)
    assert not any(n.endswith("attn2.to_k") for n in p2.layers)  # cross-attention k/v stay frozen
    scale_names = {n for n, _ in p2.scales}
    assert not any("time_emb_proj" in n for n in scale_names)
    assert any("processor.probs_quantizer" in n for n in scale_names) and any(n.startswith("conv_in.") for n in scale_names)
    assert not any("weight_quantizer" in n for n in scale_names)


def test_finetuning_lowers_the_loss_and_touches_only_the_selected_tensors() -> None:
    qunet, fp, calib = quantized_pair()
    before = {k: v.clone() for k, v in qunet.unet.state_dict().items()}
    settings = fast_settings(steps=12, lr=3e-3)
    log = QuestFinetuner(qunet, fp, calib, settings).run()
    steps = [r for r in log if "loss" in r and r["stage"] == "critical"]
    assert sum(r["loss"] for r in steps[-3:]) < sum(r["loss"] for r in steps[:3])
    after = qunet.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith("time_emb_proj.weight") for k in changed) and any(".ff.net." in k for k in changed)
    assert not any("weight_quantizer" in k for k in changed)
    assert not any(k.endswith("conv1.weight") or k.startswith("conv_in.weight") for k in changed)


def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    q_ref, fp_ref, calib = quantized_pair()
    reference = QuestFinetuner(q_ref, fp_ref, calib, fast_settings()).run()
    expected = q_ref.unet.state_dict()

    q1, fp1, _ = quantized_pair()
    state = tmp_path / "state.safetensors"

    def interrupt(stage: str, done: int, total: int, record) -> None:
        if stage == "critical" and done == 1:
            os.kill(os.getpid(), signal.SIGINT)  # handled: saved at the step boundary

    with pytest.raises(StopRequested):
        QuestFinetuner(q1, fp1, calib, fast_settings(), state_path=state).run(progress=interrupt)
    assert state.is_file()
    q2, fp2, _ = quantized_pair()  # a fresh process: same init, state from disk
    log = QuestFinetuner(q2, fp2, calib, fast_settings(), state_path=state).run(resume=True)
    result = q2.unet.state_dict()
    assert all(torch.equal(result[k], expected[k]) for k in expected)
    assert len([r for r in log if "loss" in r]) == len([r for r in reference if "loss" in r])


def test_resume_refuses_state_of_other_settings(tmp_path: Path) -> None:
    qunet, fp, calib = quantized_pair()
    state = tmp_path / "state.safetensors"
    settings = fast_settings(steps=3)
    settings.checkpoint_every = 1
    QuestFinetuner(qunet, fp, calib, settings, state_path=state).run()
    q2, fp2, _ = quantized_pair()
    with pytest.raises(QuantConfigError, match="other settings"):
        QuestFinetuner(q2, fp2, calib, fast_settings(steps=5), state_path=state).run(resume=True)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    qunet, fp, calib = quantized_pair(dtype=torch.float64)
    QuestFinetuner(qunet, fp, calib, fast_settings(steps=3), dist=DistContext(rank, world)).run()
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in qunet.unet.state_dict().items()}, os.path.join(out_dir, "ddp.safetensors"))
    dist.destroy_process_group()


def test_two_gloo_processes_match_one_process_with_the_combined_batch(tmp_path: Path) -> None:
    """In float64: Adam normalises each gradient element, so float32 round-off in near-zero
    gradients (from the different batch split) could flip an update's sign; float64 keeps the
    comparison about the algorithm (sharding + gradient averaging), not about round-off."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ddp = load_file(str(tmp_path / "ddp.safetensors"))
    torch.set_num_threads(1)
    qunet, fp, calib = quantized_pair(dtype=torch.float64)
    before = {k: v.clone() for k, v in qunet.unet.state_dict().items()}
    QuestFinetuner(qunet, fp, calib, fast_settings(steps=3)).run()
    single = qunet.unet.state_dict()
    for key, value in single.items():
        assert torch.allclose(ddp[key], value, rtol=1e-9, atol=1e-9), key
    assert any(not torch.equal(before[k], single[k]) for k in single if k.endswith("time_emb_proj.weight"))


def test_gradient_checkpointing_trains_to_the_same_weights() -> None:
    """Recomputing blocks in backward (the sd15 recipes' memory saver) changes memory, not results."""
    from dataclasses import replace

    results = []
    for checkpointing in (False, True):
        qunet, fp, calib = quantized_pair()
        log = QuestFinetuner(qunet, fp, calib, replace(fast_settings(steps=3), gradient_checkpointing=checkpointing)).run()
        results.append(({k: v.clone() for k, v in qunet.unet.state_dict().items()}, [r["loss"] for r in log if "loss" in r]))
        assert not qunet.unet.is_gradient_checkpointing  # switched off again after the run
    (plain, plain_loss), (recomputed, recomputed_loss) = results
    assert recomputed_loss == pytest.approx(plain_loss, rel=1e-5)
    assert max(float((plain[k] - recomputed[k]).abs().max()) for k in plain if plain[k].is_floating_point()) < 1e-5


def test_gradient_checkpointing_with_blockwise_loss_is_refused() -> None:
    from quest.recipe_blocks import FinetuneBlock

    with pytest.raises(QuantConfigError, match="gradient_checkpointing works with loss: quest only"):
        FinetuneBlock.from_dict({"loss": "blockwise", "gradient_checkpointing": True})
