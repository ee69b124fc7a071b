"""diffusers pipelines owned by this project (the digits demo); SD uses diffusers' own."""

from quest_export.pipelines.digits import DigitsPipeline

__all__ = ["DigitsPipeline"]
