"""`quest-export eval`: sample a model with fixed seeds and measure it (and its FP twin)."""

from __future__ import annotations

import time
from typing import Any

import torch

from quest_export.evaluation.image_metrics import psnr
from quest_export.models.resolve import LoadedModel
from quest_export.sampling import balanced_labels, sample_digits, sample_prompts

UNAVAILABLE_SD = (
    "FID and CLIP score need feature-extractor weights (Inception, CLIP) that are not available "
    "locally; label accuracy applies only to the digits model"
)
PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; cap them so the mean stays finite


def _sample(model: LoadedModel, num_samples: int, steps: int, guidance: float, seed: int, batch_size: int, prompts: list[str], progress: bool) -> torch.Tensor:
    if model.traits.class_conditional:
        return sample_digits(model, balanced_labels(num_samples), steps, guidance, seed, batch_size=batch_size, progress=progress)
    cycled = [prompts[i % len(prompts)] for i in range(num_samples)]
    return sample_prompts(model, cycled, steps, guidance, seed, progress=progress)


def evaluate(
    model: LoadedModel,
    num_samples: int,
    steps: int,
    seed: int,
    guidance: float,
    batch_size: int = 250,
    progress: bool = False,
    fp_twin: LoadedModel | None = None,
    prompts: list[str] | None = None,
) -> dict[str, Any]:
    """Metrics JSON: FID, label accuracy and the real-data floor (digits), and with ``fp_twin``
    the PSNR of each sample against the FP model's sample from the same seed and noise."""
    result: dict[str, Any] = {
        "model": model.spec.name,
        "model_source": model.spec.source,
        "num_samples": num_samples,
        "steps": steps,
        "seed": seed,
        "guidance": guidance,
        "fid": None,
        "fid_real_floor": None,
        "label_accuracy": None,
    }
    prompts = prompts or ["a photograph of an astronaut riding a horse"]
    needs_samples = model.traits.metric_classifier or fp_twin is not None
    if not needs_samples:
        result["notes"] = UNAVAILABLE_SD
        return result
    started = time.perf_counter()
    images = _sample(model, num_samples, steps, guidance, seed, batch_size, prompts, progress)
    result["sampling_seconds"] = round(time.perf_counter() - started, 2)
    if fp_twin is not None:
        reference = _sample(fp_twin, num_samples, steps, guidance, seed, batch_size, prompts, progress)
        values = psnr(images, reference).clamp(max=PSNR_CAP_DB)
        result["psnr_vs_fp"] = float(values.mean())
    if not model.traits.metric_classifier:
        result["notes"] = UNAVAILABLE_SD
        return result
    from quest_export.evaluation.digits_metrics import DigitsMetrics

    metrics = DigitsMetrics()
    labels = balanced_labels(num_samples)
    result["fid"] = metrics.fid(images) if num_samples >= 2 else None
    result["fid_real_floor"] = metrics.fid_real_floor
    result["fid_real_floor_samples"] = metrics.held_out_count
    result["label_accuracy"] = metrics.label_accuracy(images, labels)
    result["classifier_held_out_accuracy"] = metrics.classifier_held_out_accuracy
    return result
