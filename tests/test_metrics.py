"""FID formula and PSNR against closed-form values."""

from __future__ import annotations

import math

import numpy as np
import torch

from quest_export.evaluation.fid import FeatureStats, frechet_distance
from quest_export.evaluation.image_metrics import psnr


def test_fid_of_identical_statistics_is_zero() -> None:
    feats = np.random.default_rng(0).normal(size=(500, 8))
    stats = FeatureStats.from_features(feats)
    assert abs(frechet_distance(stats, stats)) < 1e-6


def test_fid_matches_closed_form_for_diagonal_gaussians() -> None:
    # N(m1, diag(a)) vs N(m2, diag(b)): |m1-m2|^2 + sum(a + b - 2 sqrt(a b))
    a = FeatureStats(np.array([0.0, 1.0]), np.diag([1.0, 4.0]), 10)
    b = FeatureStats(np.array([3.0, 1.0]), np.diag([9.0, 1.0]), 10)
    expected = 9.0 + (1 + 9 - 2 * 3) + (4 + 1 - 2 * 2)
    assert math.isclose(frechet_distance(a, b), expected, rel_tol=1e-9)


def test_fid_grows_with_mean_shift() -> None:
    rng = np.random.default_rng(1)
    base = FeatureStats.from_features(rng.normal(size=(400, 4)))
    near = FeatureStats.from_features(rng.normal(size=(400, 4)) + 0.1)
    far = FeatureStats.from_features(rng.normal(size=(400, 4)) + 1.0)
    assert frechet_distance(base, near) < frechet_distance(base, far)


def test_psnr_hand_computed() -> None:
    ref = torch.zeros(2, 1, 4, 4)
    img = torch.full((2, 1, 4, 4), 0.1)
    assert torch.allclose(psnr(img, ref), torch.full((2,), 20.0))
    assert torch.isinf(psnr(ref, ref)).all()
