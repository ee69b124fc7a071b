"""Every diffusers scheduler samples sane digits through ``DigitsPipeline`` (FP model).

The pipeline must set the timesteps before scaling the initial noise by ``init_noise_sigma`` and
call ``scale_model_input`` (as diffusers' own pipelines do); sigma-based schedulers (Euler, Heun)
blow every pixel out to 0 or 1 otherwise, which these checks catch through the classifier and the
pixel statistics.
"""

from __future__ import annotations

import diffusers
import pytest
import torch

from quest_export.evaluation.digits_metrics import DigitsMetrics
from quest_export.models.resolve import load_model

SCHEDULERS = [
    ("DDIMScheduler", 10),
    ("DPMSolverMultistepScheduler", 10),
    ("EulerDiscreteScheduler", 10),
    ("EulerAncestralDiscreteScheduler", 15),
    ("HeunDiscreteScheduler", 8),
    ("UniPCMultistepScheduler", 10),
]


@pytest.fixture(scope="module")
def digits():
    return load_model("digits"), DigitsMetrics()


@pytest.mark.parametrize("name,steps", SCHEDULERS)
def test_every_scheduler_samples_recognisable_digits(digits, name: str, steps: int) -> None:
    model, metrics = digits
    pipe = model.pipeline
    default = pipe.scheduler
    pipe.scheduler = getattr(diffusers, name).from_config(default.config)
    try:
        labels = torch.arange(20) % 10
        noise = torch.randn(20, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        images = pipe(labels, num_inference_steps=steps, guidance_scale=2.0, latents=noise, output_type="pt",
                      generator=torch.Generator().manual_seed(1)).images
    finally:
        pipe.scheduler = default
    assert images.shape == (20, 1, 16, 16) and torch.isfinite(images).all()
    saturated = float(((images < 0.01) | (images > 0.99)).float().mean())
    # the FP model's DDIM samples: mean 0.32, about 20-30% of pixels at the ends (the digits' stroke and background)
    assert 0.2 < float(images.mean()) < 0.45, (name, float(images.mean()))
    assert saturated < 0.5, (name, saturated)
    assert metrics.label_accuracy(images, labels) >= 0.9, name
