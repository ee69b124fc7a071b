"""Save a batch of images as one PNG grid (atomically)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from quest_export.artifacts import atomic_path


def image_grid(images: torch.Tensor, ncols: int | None = None, upscale: int = 1, pad: int = 1) -> Image.Image:
    """Tile images in [0, 1] of shape (N, C, H, W) into one PIL image."""
    n, channels, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    canvas = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, channels), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = arr[i].transpose(1, 2, 0)
    mode = "L" if channels == 1 else "RGB"
    image = Image.fromarray(canvas[..., 0] if channels == 1 else canvas, mode=mode)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    return image


def save_grid(images: torch.Tensor, path: Path, ncols: int | None = None, upscale: int = 1) -> Path:
    grid = image_grid(images, ncols=ncols, upscale=upscale)
    with atomic_path(Path(path)) as tmp:
        grid.save(tmp, format="PNG")
    return Path(path)
