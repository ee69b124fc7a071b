"""Layer-group sensitivity: ranking contents, exact state restoration, and the bar chart."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from quest.calibration import CalibrationSet
from quest.ptq import calibrate
from quest.quantize import QuantizedUNet, quantize_unet, set_quantizers_enabled
from quest.recipe import Recipe
from quest.sensitivity import (
    LAYER_GROUPS,
    TEMPORAL_GROUPS,
    fp_reference,
    measure_sensitivity,
    output_error,
    sensitivity_report,
    stratified_rows,
)
from quest_export.evaluation.sensitivity_plot import plot_sensitivity
from quest_export.models.digits.unet import build_digits_unet

TIMESTEPS = (800, 200)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _calibration_set(rows: int = 6) -> CalibrationSet:
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([TIMESTEPS[i % 2] for i in range(rows)], dtype=torch.long)
    return CalibrationSet(
        x=torch.randn(rows, 1, 16, 16, generator=g),
        t=t,
        cond=torch.randn(rows, 4, 32, generator=g),
        uncond=torch.randn(rows, 4, 32, generator=g),
        meta={"rows": rows},
    )


def _forward(qunet: QuantizedUNet, calib: CalibrationSet) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([qunet.unet(x, t, encoder_hidden_states=s).sample for x, t, s in calib.batches(4)])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Intra-op threads on a busy small machine spin against each other (100x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(one_thread) -> tuple[QuantizedUNet, CalibrationSet]:
    torch.manual_seed(0)
    unet = build_digits_unet().eval()
    qunet = quantize_unet(unet, Recipe(weight_bits=4, act_bits=4, target="tensorrt", timestep_groups=2))
    calib = _calibration_set()

    def loop(module: torch.nn.Module) -> None:
        for x, t, states in calib.batches(4):
            module(x, t, encoder_hidden_states=states)

    calibrate(qunet, loop, weight_method="minmax", activation_method="minmax")
    return qunet, calib


@pytest.fixture(scope="module")
def measured(setup) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    qunet, calib = setup
    before = _forward(qunet, calib)
    results = measure_sensitivity(qunet, calib, batch_size=4)
    return results, before, _forward(qunet, calib)


def test_every_group_has_a_finite_non_negative_error(measured) -> None:
    results, _, _ = measured
    assert results
    for r in results:
        assert math.isfinite(r["mse"]) and r["mse"] >= 0, r
        assert r["layers"] > 0 and r["quantizers"] >= r["layers"], r
        assert r["group"] in LAYER_GROUPS
    assert [r["mse"] for r in results] == sorted((r["mse"] for r in results), reverse=True)


def test_temporal_groups_are_present_and_flagged(measured) -> None:
    results, _, _ = measured
    flagged = {r["group"] for r in results if r["temporal"]}
    assert flagged == set(TEMPORAL_GROUPS)
    assert all(not r["temporal"] for r in results if r["group"] not in TEMPORAL_GROUPS)


def test_per_timestep_keys_are_the_calibration_timesteps(measured, setup) -> None:
    results, _, _ = measured
    _, calib = setup
    for r in results:
        assert set(r["mse_per_timestep"]) == {str(t) for t in calib.timesteps}
        assert all(math.isfinite(v) and v >= 0 for v in r["mse_per_timestep"].values())


def test_model_output_is_unchanged_by_the_analysis(measured) -> None:
    _, before, after = measured
    assert torch.equal(before, after)


def test_partial_enabled_flags_are_restored_exactly(setup) -> None:
    qunet, calib = setup
    set_quantizers_enabled(qunet, False, "conv_out.*")
    try:
        flags = {n: m.enabled for n, m in qunet.unet.named_modules() if hasattr(m, "enabled") and not hasattr(m, "parts")}
        measure_sensitivity(qunet, calib, batch_size=4, max_rows=2)
        assert flags == {n: m.enabled for n, m in qunet.unet.named_modules() if hasattr(m, "enabled") and not hasattr(m, "parts")}
    finally:
        set_quantizers_enabled(qunet, True)


def test_whole_model_error_is_at_least_the_mildest_group(measured, setup) -> None:
    results, _, _ = measured
    qunet, calib = setup
    reference = fp_reference(qunet, calib, batch_size=4)
    full, _ = output_error(qunet, calib, reference, batch_size=4)
    assert full >= min(r["mse"] for r in results)


def test_stratified_rows_keep_every_timestep(setup) -> None:
    _, calib = setup
    subset = stratified_rows(calib, 2)
    assert len(subset) == 2 and subset.timesteps == calib.timesteps


def test_report_lists_ranking_and_temporal_subset(measured) -> None:
    results, _, _ = measured
    report = sensitivity_report(results, {"model": "digits", "bits": "w4a4", "target": "tensorrt", "rows": 6})
    assert list(report)[:3] == ["model", "bits", "target"] and report["rows"] == 6
    assert report["ranking"] == results
    assert {r["group"] for r in report["temporal"]} == set(TEMPORAL_GROUPS)


def test_plot_writes_a_png_atomically(measured, tmp_path: Path) -> None:
    results, _, _ = measured
    results = results + [dict(results[0], group="zero", mse=0.0)]  # a zero must not break the log axis
    out = tmp_path / "sensitivity.png"
    assert plot_sensitivity(results, out, "digits w4a4") == out
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sensitivity.png"]
