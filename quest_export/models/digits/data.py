"""scikit-learn's bundled handwritten digits (8x8, offline), upsampled and split reproducibly.

The split is fixed by a seed so that training, the FID reference set and the held-out floor always
see the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.25


@dataclass(frozen=True)
class DigitsSplit:
    """Images in [-1, 1], shape (N, 1, IMAGE_SIZE, IMAGE_SIZE), and integer labels."""

    images: torch.Tensor
    labels: torch.Tensor


def load_digits_tensors(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as float images in [-1, 1] upsampled bilinearly to ``size`` x ``size``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0) * 2.0 - 1.0
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return images, labels


def digits_splits(size: int = IMAGE_SIZE) -> tuple[DigitsSplit, DigitsSplit]:
    """(train, held_out): a stratified, seeded split. Train is also the FID reference set."""
    images, labels = load_digits_tensors(size)
    rng = np.random.default_rng(SPLIT_SEED)
    train_idx: list[int] = []
    held_idx: list[int] = []
    for cls in range(NUM_CLASSES):
        idx = np.flatnonzero(labels.numpy() == cls)
        rng.shuffle(idx)
        n_held = int(round(len(idx) * HELD_OUT_FRACTION))
        held_idx.extend(idx[:n_held].tolist())
        train_idx.extend(idx[n_held:].tolist())
    train_t = torch.tensor(sorted(train_idx))
    held_t = torch.tensor(sorted(held_idx))
    return (
        DigitsSplit(images[train_t], labels[train_t]),
        DigitsSplit(images[held_t], labels[held_t]),
    )
