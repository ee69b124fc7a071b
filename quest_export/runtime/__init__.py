"""Runtime: built engines as drop-in diffusers components."""

from quest_export.runtime.engine_unet import EngineUNet

__all__ = ["EngineUNet"]
