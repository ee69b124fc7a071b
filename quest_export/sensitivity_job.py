"""``quest-export sensitivity`` as a library call: PTQ the model, quantize one layer group at a time
(quest.sensitivity), write the ranking JSON and its bar chart atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_sensitivity(model: str, recipe, profile, calibration: Path | None, out: Path, *, max_rows: int | None = None,
                    force: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    """The layer groups, worst first (also written to ``out``/sensitivity.json and .png)."""
    from quest.ptq import calibrate as ptq_calibrate
    from quest.quantize import quantize_unet
    from quest.sensitivity import measure_sensitivity, sensitivity_report
    from quest_export.artifacts import atomic_directory, write_json_atomic
    from quest_export.evaluation.sensitivity_plot import plot_sensitivity
    from quest_export.finetune_job import model_and_calibration
    from quest_export.quantization import forward_loop_for

    loaded, calib, _ = model_and_calibration(model, recipe, profile, calibration, device)
    qunet = quantize_unet(loaded.pipeline.unet, recipe, profile)
    ptq_calibrate(qunet, forward_loop_for(calib))
    results = measure_sensitivity(qunet, calib, max_rows=max_rows)
    report = sensitivity_report(results, {"model": loaded.spec.name, "bits": recipe.bits, "target": profile.name,
                                          "recipe": recipe.name, "calibration_rows": len(calib)})
    with atomic_directory(out, force=force) as tmp:
        write_json_atomic(tmp / "sensitivity.json", report)
        plot_sensitivity(results, tmp / "sensitivity.png",
                         f"{loaded.spec.name} {recipe.bits} ({profile.name}): output MSE with one group quantized")
    return results
