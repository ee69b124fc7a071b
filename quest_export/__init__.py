"""quest-export: QuEST finetuning -> Q/DQ ONNX -> TensorRT / ONNX Runtime engines -> diffusers runtime.

Heavy imports are lazy: ``DigitsPipeline`` and ``LabelEncoder`` resolve on first access, which is
also how diffusers finds the digits pipeline's custom component when it loads ``model_index.json``.
"""

from __future__ import annotations

from typing import Any

from quest.version import __version__  # noqa: F401 - one version for both packages

_LAZY = {
    "DigitsPipeline": "quest_export.pipelines.digits",
    "LabelEncoder": "quest_export.models.digits.label_encoder",
    "DigitClassifier": "quest_export.models.digits.classifier",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quest_export' has no attribute {name!r}")
