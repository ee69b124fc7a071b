"""Quality of digits samples, measured with the shipped digit classifier.

The reference statistics are the classifier features of the training split (the distribution the
UNet learned); ``fid_real_floor`` is the FID of the held-out real split against them, i.e. the best
a perfect generator with that many samples can expect.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from quest_export.errors import UserError
from quest_export.evaluation.fid import FeatureStats, frechet_distance
from quest_export.models.digits.classifier import DigitClassifier
from quest_export.models.digits.data import digits_splits


class DigitsMetrics:
    """FID and label accuracy for images in [0, 1] of shape (N, 1, 16, 16)."""

    def __init__(self, classifier_dir: Path | None = None) -> None:
        from quest_export.models.resolve import DIGIT_CLASSIFIER_DIR

        directory = Path(classifier_dir or DIGIT_CLASSIFIER_DIR)
        try:
            self.classifier = DigitClassifier.from_pretrained(directory).eval()
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the digit classifier from {directory}: {str(exc).splitlines()[0]}") from None
        self._train, self._held_out = digits_splits(self.classifier.config.image_size)

    @torch.no_grad()
    def features(self, images01: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images01.float() * 2.0 - 1.0)

    @torch.no_grad()
    def predict(self, images01: torch.Tensor) -> torch.Tensor:
        return self.classifier(images01.float() * 2.0 - 1.0).argmax(1)

    @property
    def held_out_count(self) -> int:
        return len(self._held_out.labels)

    @cached_property
    def reference(self) -> FeatureStats:
        return FeatureStats.from_features(self.classifier.features(self._train.images).detach().numpy())

    @cached_property
    def fid_real_floor(self) -> float:
        held = self.classifier.features(self._held_out.images).detach().numpy()
        return frechet_distance(FeatureStats.from_features(held), self.reference)

    @cached_property
    def classifier_held_out_accuracy(self) -> float:
        return self.label_accuracy((self._held_out.images + 1) / 2, self._held_out.labels)

    def fid(self, images01: torch.Tensor) -> float:
        return frechet_distance(FeatureStats.from_features(self.features(images01).numpy()), self.reference)

    def label_accuracy(self, images01: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(images01) == labels).float().mean())
