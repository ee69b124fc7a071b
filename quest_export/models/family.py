"""What general code needs to know about a family of models, kept with the models: the digits demo
states its own facts in ``models/digits/family.py``; everything loaded through diffusers'
``DiffusionPipeline`` (Stable Diffusion and the like) uses :data:`DIFFUSERS`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    name: str
    default_guidance: float  # classifier-free guidance scale when --guidance is not given
    class_conditional: bool  # conditioned on class labels (sampled per label), not on text prompts
    trace_tokens: int  # conditioning tokens the exported graph is traced with
    images_per_call: int  # images generate samples per pipeline call
    shipped: bool  # the package carries it: checkpoints reload it by name, not by the path it had
    metric_classifier: bool  # FID / label accuracy from a classifier shipped with the model (evaluation/digits_metrics.py)


DIFFUSERS = ModelFamily("diffusers", default_guidance=7.5, class_conditional=False, trace_tokens=77, images_per_call=4,
                        shipped=False, metric_classifier=False)


def family(name: str) -> ModelFamily:
    """The family called ``name`` (``ModelSpec.family``)."""
    if name == DIFFUSERS.name:
        return DIFFUSERS
    from quest_export.models.digits.family import DIGITS

    if name == DIGITS.name:
        return DIGITS
    raise KeyError(name)
