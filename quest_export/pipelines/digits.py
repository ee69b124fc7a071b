"""Sampling pipeline for the class-conditional digits UNet (DDIM by default, any diffusers scheduler).

It is an ordinary ``DiffusionPipeline``: ``pipe.unet`` can be replaced by any object with the
``UNet2DConditionModel`` call signature (an engine-backed UNet, a quantized simulation), and
``pipe.scheduler`` by any diffusers scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

# diffusers loads custom components only from modules that are already imported
from quest_export.models.digits.label_encoder import LabelEncoder
from quest_export.pipelines.denoise import denoise, unet_fn

StepCallback = Callable[["DigitsPipeline", int, torch.Tensor, dict[str, Any]], dict[str, Any] | None]


class DigitsPipeline(DiffusionPipeline):
    """Label-conditioned sampling with classifier-free guidance."""

    model_cpu_offload_seq = "label_encoder->unet"

    def __init__(self, unet: Any, scheduler: Any, label_encoder: LabelEncoder) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, label_encoder=label_encoder)

    def encode_labels(self, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Cross-attention states; with guidance, the null-label batch comes first (as in SD)."""
        cond = self.label_encoder(labels)
        if guidance_scale > 1.0:
            null = torch.full_like(labels, self.label_encoder.null_label)
            cond = torch.cat([self.label_encoder(null), cond])
        return cond

    @torch.no_grad()
    def __call__(
        self,
        labels: Sequence[int] | torch.Tensor,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        progress: bool = False,
    ) -> ImagePipelineOutput | tuple:
        device = self._execution_device
        labels_t = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        num_labels = int(self.label_encoder.config.num_labels)
        if labels_t.numel() == 0 or labels_t.min() < 0 or labels_t.max() >= num_labels:
            raise ValueError(f"labels must be integers in [0, {num_labels - 1}]")
        batch = labels_t.shape[0]
        config = self.unet.config
        shape = (batch, config.in_channels, config.sample_size, config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        states = self.encode_labels(labels_t, guidance_scale)
        self.set_progress_bar_config(disable=not progress)
        on_step = None
        if callback_on_step_end is not None:
            def on_step(i: int, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
                return callback_on_step_end(self, i, t, tensors)
        latents = denoise(unet_fn(self.unet), self.scheduler, latents.to(device), states, guidance_scale,
                          num_inference_steps, generator=generator, on_step=on_step, progress=self.progress_bar)

        images = (latents / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            result: Any = images
        elif output_type == "np":
            result = images.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type == "pil":
            arrays = (images[:, 0].cpu().numpy() * 255).round().astype(np.uint8)
            result = [Image.fromarray(a, mode="L") for a in arrays]
        else:
            raise ValueError(f"output_type must be 'pt', 'np' or 'pil', not {output_type!r}")
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
