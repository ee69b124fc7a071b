"""Searched timestep grouping: a valid, covering, contiguous lookup that survives checkpoints."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch

from quest.checkpoint import load_checkpoint, save_checkpoint
from quest.errors import QuantConfigError
from quest.grouping import GroupingSearch, check_lookup, contiguous_assignment, nearest_lookup, search_grouping
from quest.recipe import Recipe
from quest.timesteps import uniform_group_lookup
from test_finetune import quantized_pair


def _brute_force(scores: torch.Tensor) -> float:
    n, g = scores.shape
    best = -float("inf")
    for cuts in itertools.combinations(range(1, n), g - 1):
        bounds = (0, *cuts, n)
        best = max(best, sum(float(scores[bounds[j] : bounds[j + 1], j].sum()) for j in range(g)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_contiguous_assignment_is_the_best_ordered_split(seed: int) -> None:
    scores = torch.randn(7, 3, generator=torch.Generator().manual_seed(seed))
    labels = contiguous_assignment(scores)
    assert labels == sorted(labels) and set(labels) == {0, 1, 2}
    assert sum(float(scores[k, label]) for k, label in enumerate(labels)) == pytest.approx(_brute_force(scores))


def test_contiguous_assignment_refuses_more_groups_than_timesteps() -> None:
    with pytest.raises(QuantConfigError, match="non-empty groups"):
        contiguous_assignment(torch.zeros(2, 3))


def test_nearest_lookup_covers_every_timestep() -> None:
    lookup = nearest_lookup([900, 50, 300, 600], [2, 0, 0, 1], 1000)
    assert lookup.shape == (1000,) and lookup[0] == 0 and lookup[999] == 2
    assert lookup[450] == 0 and lookup[451] == 1  # ties go to the lower visited timestep
    check_lookup(lookup, 3)
    with pytest.raises(ValueError, match="invalid timestep lookup"):
        check_lookup(torch.zeros(1000, dtype=torch.long), 3)


def test_search_installs_a_valid_lookup_and_the_checkpoint_round_trips(tmp_path: Path) -> None:
    qunet, fp, calib = quantized_pair(groups=3)
    fresh = copy.deepcopy(fp)
    qunet.recipe = Recipe(weight_bits=4, act_bits=8, target="tensorrt", timestep_groups=3, grouping="searched")
    report = search_grouping(qunet, fp, calib, GroupingSearch(steps=4, batch_size=4, prior=0.0))
    lookup = qunet.context.lookup
    check_lookup(lookup, 3)
    assert lookup.shape == (1000,) and (lookup.diff() >= 0).all()  # contiguous, ordered in t
    assert sorted(report["visited_groups"]) == report["visited_groups"] and set(report["visited_groups"]) == {0, 1, 2}

    # a deliberately non-uniform (and non-contiguous) lookup must survive save/load exactly
    custom = torch.tensor([2, 0, 1, 0]).repeat_interleave(250)
    qunet.context.lookup.copy_(custom)
    assert not torch.equal(custom, uniform_group_lookup(3))
    x, t, states = calib.unet_inputs(torch.arange(len(calib)))
    expected = qunet.unet(x, t, encoder_hidden_states=states).sample
    save_checkpoint(tmp_path, qunet, {"model": {"name": "test", "source": "test", "content_hash": None}, "method": "quest"})
    grid = json.loads((tmp_path / "quant.json").read_text())["timestep_grid"]
    assert grid["grouping"] == "searched" and grid["group_starts"] == [0, 250, 500, 750] and grid["run_groups"] == [2, 0, 1, 0]
    restored = load_checkpoint(tmp_path, fresh)
    assert torch.equal(restored.context.lookup, custom)
    assert torch.equal(restored.unet(x, t, encoder_hidden_states=states).sample, expected)


def test_recipe_validates_the_new_options() -> None:
    for bad in ({"grouping": "random"}, {"weight_dilation": "yes"}, {"grouping_search": {"stepz": 3}}, {"finetune": {"loss": "kd"}}):
        with pytest.raises(QuantConfigError):
            Recipe.from_dict({"bits": "w4a8", **bad})
    with pytest.raises(QuantConfigError, match="step_selection"):
        Recipe.from_dict({"bits": "w4a8", "calibration": {"step_selection": "random"}})
    recipe = Recipe.from_dict({"bits": "w4a8"})
    assert (recipe.grouping, recipe.weight_dilation, recipe.calibration.step_selection) == ("uniform", False, "uniform")
