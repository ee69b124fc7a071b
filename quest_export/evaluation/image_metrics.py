"""Per-image comparisons between a quantized sample and its FP twin."""

from __future__ import annotations

import torch


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image (images in [0, data_range]); identical images give +inf."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)
