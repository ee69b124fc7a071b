"""Model loading: the shipped `digits` demo, Stable Diffusion aliases, local dirs and hub ids."""

from quest_export.models.resolve import LoadedModel, ModelSpec, load_model, resolve_model_spec

__all__ = ["LoadedModel", "ModelSpec", "load_model", "resolve_model_spec"]
