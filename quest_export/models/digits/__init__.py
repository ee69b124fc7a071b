"""The `digits` demo: a class-conditional UNet2DConditionModel on scikit-learn's handwritten digits,
its label encoder, and the digit classifier that provides the quality metrics."""

from quest_export.models.digits.classifier import DigitClassifier
from quest_export.models.digits.label_encoder import LabelEncoder

__all__ = ["DigitClassifier", "LabelEncoder"]
