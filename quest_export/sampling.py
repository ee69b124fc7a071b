"""Seeded sampling for any loaded model, reproducible sample by sample.

All initial noise is drawn up front from one seeded generator, so sample ``i`` gets the same noise
whatever the batch size; a quantized model sampled with the same seed is the FP model's twin.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quest_export.models.resolve import LoadedModel


def default_guidance(guidance: float | None, model: LoadedModel) -> float:
    """Classifier-free guidance scale: ``guidance``, else the model family's default."""
    return guidance if guidance is not None else model.traits.default_guidance


def balanced_labels(count: int, num_classes: int = 10) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ... (``count`` labels)."""
    return torch.arange(count) % num_classes


def initial_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def sample_digits(
    model: LoadedModel,
    labels: torch.Tensor,
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int = 250,
    progress: bool = False,
) -> torch.Tensor:
    """Images in [0, 1], shape (N, 1, H, W), for the given labels."""
    pipe = model.pipeline
    config = pipe.unet.config
    noise = initial_noise((len(labels), config.in_channels, config.sample_size, config.sample_size), seed)
    chunks = []
    for start in range(0, len(labels), batch_size):
        out = pipe(
            labels[start : start + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise[start : start + batch_size],
            output_type="pt",
            progress=progress,
        )
        chunks.append(out.images.cpu())
    return torch.cat(chunks)


def sample_prompts(
    model: LoadedModel,
    prompts: Sequence[str],
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int = 4,
    progress: bool = False,
) -> torch.Tensor:
    """Images in [0, 1], shape (N, 3, H, W), from a text-conditioned diffusers pipeline."""
    pipe = model.pipeline
    unet_config = pipe.unet.config
    scale = getattr(pipe, "vae_scale_factor", 8)
    height = width = int(unet_config.sample_size) * scale
    noise = initial_noise((len(prompts), unet_config.in_channels, unet_config.sample_size, unet_config.sample_size), seed)
    pipe.set_progress_bar_config(disable=not progress)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        out = pipe(
            prompt=list(prompts[start : start + batch_size]),
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise[start : start + batch_size],
            height=height,
            width=width,
            output_type="pt",
        )
        chunks.append(out.images.float().clamp(0, 1).cpu())
    return torch.cat(chunks)


def sample_grid(model: LoadedModel, num_images: int, steps: int, guidance: float, seed: int, label: int | None = None,
                prompts: list[str] | None = None, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Images for ``generate``'s grid, and the grid layout that suits them: class-conditional
    models draw ``label`` (or every class in turn, one class per column), others cycle ``prompts``."""
    if model.traits.class_conditional:
        labels = torch.full((num_images,), label) if label is not None else balanced_labels(num_images)
        return sample_digits(model, labels, steps, guidance, seed, progress=progress), {"ncols": 10 if label is None else None, "upscale": 4}
    prompts = list(prompts or ["a photograph of an astronaut riding a horse"])
    prompts = [prompts[i % len(prompts)] for i in range(max(num_images, len(prompts)))]
    return sample_prompts(model, prompts, steps, guidance, seed, progress=progress), {}
