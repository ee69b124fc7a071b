"""The guided denoising loop shared by ``DigitsPipeline`` and the engine verification.

It does what diffusers' own pipelines do with any scheduler: set the timesteps first, scale the
initial noise by ``init_noise_sigma``, ``scale_model_input`` before every call, pass a generator
only to schedulers that take one, and combine the [uncond; cond] halves with the guidance scale.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

# (sample, timestep, encoder_hidden_states) -> noise prediction
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (step index, timestep, {"latents", "model_input", "encoder_hidden_states"}) -> optional {"latents": ...}
StepFn = Callable[[int, torch.Tensor, dict[str, torch.Tensor]], dict[str, Any] | None]


def unet_fn(unet: Any) -> ModelFn:
    """A UNet2DConditionModel-like object (FP, simulated, EngineUNet) as a :data:`ModelFn`."""
    return lambda x, t, states: unet(x, t, encoder_hidden_states=states, return_dict=False)[0]


@torch.no_grad()
def denoise(model: ModelFn, scheduler: Any, noise: torch.Tensor, states: torch.Tensor, guidance_scale: float,
            num_inference_steps: int, *, generator: torch.Generator | list[torch.Generator] | None = None,
            on_step: StepFn | None = None, progress: Callable[[Iterable], Iterable] = lambda it: it) -> torch.Tensor:
    """Sample from ``noise`` (unit variance); ``states`` is [uncond; cond] when ``guidance_scale > 1``."""
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    latents = noise.to(torch.float32) * scheduler.init_noise_sigma  # the schedule's own largest sigma
    guided = guidance_scale > 1.0
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(progress(scheduler.timesteps)):
        model_in = torch.cat([latents] * 2) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        noise_pred = model(model_in, t, states)
        if guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (cond - uncond)
        if on_step is not None:
            update = on_step(i, t, {"latents": latents, "model_input": model_in, "encoder_hidden_states": states})
            if update and "latents" in update:
                latents = update["latents"]
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
    return latents
