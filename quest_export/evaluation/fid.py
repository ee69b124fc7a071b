"""Frechet distance between Gaussian fits of two feature sets (the FID formula)."""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import numpy as np
import scipy.linalg


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set."""

    mean: np.ndarray
    cov: np.ndarray
    count: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FeatureStats":
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError("FID needs at least 2 feature vectors")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0])


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    diff = a.mean - b.mean
    warnings.filterwarnings("ignore", message="Matrix is singular", category=scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(a.cov @ b.cov)
    if not np.isfinite(covmean).all():
        offset = np.eye(a.cov.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((a.cov + offset) @ (b.cov + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * np.trace(covmean))
