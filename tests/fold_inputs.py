"""Inputs for tests of FP-model transforms on the digits UNet (dilation, smoothing, mixed precision):
a small label-like calibration set and the UNet's output on it."""

from __future__ import annotations

import torch

from quest.calibration import CalibrationSet


def label_like_calibration(dtype: torch.dtype = torch.float32, rows: int = 8) -> CalibrationSet:
    """Label-like states and noisy images at a spread of timesteps."""
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([950, 700, 400, 50]).repeat(rows // 4)
    x = torch.randn(rows, 1, 16, 16, generator=g, dtype=dtype)
    cond, uncond = (torch.randn(rows, 4, 32, generator=g, dtype=dtype) for _ in range(2))
    return CalibrationSet(x, t, cond, uncond)


def unet_output(unet, calib: CalibrationSet) -> torch.Tensor:
    x, t, states = calib.unet_inputs(torch.arange(len(calib)))
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=states).sample
