"""Calibration timestep selection: a valid, deterministic set built from the selected timestep."""

from __future__ import annotations

import pytest
import torch

from quest.calibration_steps import clean_estimate
from quest.recipe import CalibrationSettings
from quest_export.calibration_data import record_for_model, select_steps
from quest_export.models.resolve import load_model


@pytest.fixture(scope="module")
def model_and_uniform():
    model = load_model("digits")
    return model, record_for_model(model, CalibrationSettings(trajectories=4, steps=5, guidance=2.0, seed=11))


def test_selected_set_is_valid_and_deterministic(model_and_uniform) -> None:
    model, uniform = model_and_uniform
    first = select_steps(model, uniform, 2.0)
    second = select_steps(model, uniform, 2.0)
    assert torch.equal(first.x, second.x) and first.meta == second.meta
    assert first.meta["step_selection"] == "selected" and first.meta["selected_timestep"] in uniform.timesteps
    assert set(first.meta["structural_risk"]) == {str(t) for t in uniform.timesteps}
    best = min(first.meta["structural_risk"].values())
    assert first.meta["structural_risk"][str(first.meta["selected_timestep"])] == best
    # same size, same timesteps, same rows per timestep, labels taken from the selected step's rows
    assert first.x.shape == uniform.x.shape and first.timesteps == uniform.timesteps
    assert all(int((first.t == t).sum()) == int((uniform.t == t).sum()) for t in uniform.timesteps)
    rows = (uniform.t == first.meta["selected_timestep"]).nonzero().flatten()
    assert torch.equal(first.cond[first.t == uniform.timesteps[0]], uniform.cond[rows])
    assert torch.isfinite(first.x).all() and not torch.equal(first.x, uniform.x)


def test_clean_estimate_inverts_the_forward_process() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(2, 1, 4, 4, generator=g) * 2 - 1, torch.randn(2, 1, 4, 4, generator=g)
    a = 0.3
    xt = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    assert torch.allclose(clean_estimate(xt, eps, a), x0, atol=1e-5)
    v = a**0.5 * eps - (1 - a) ** 0.5 * x0
    assert torch.allclose(clean_estimate(xt, v, a, "v_prediction"), x0, atol=1e-5)
    assert clean_estimate(xt, eps * 100, a, clip=1.0).abs().max() <= 1.0
