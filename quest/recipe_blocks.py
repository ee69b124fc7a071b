"""Typed blocks of a recipe (the ``finetune:`` stages and the ``grouping_search:`` settings),
checked when the recipe loads rather than when a long job reaches them.

They live apart from :mod:`quest.finetune` and :mod:`quest.grouping` so that :mod:`quest.recipe`
can validate them without importing the modules that use a quantized UNet.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from quest.errors import QuantConfigError

FINETUNE_LOSSES = ("quest", "blockwise")  # QuEST's stages, or quest.blockwise distillation


@dataclass
class StageSpec:
    """One finetuning stage: which weights and which activation scales train, and how."""

    name: str
    weights: list[str]
    scales: list[str]
    exclude_scales: list[str] = field(default_factory=list)
    steps: int = 200
    batch_size: int = 32
    weight_lr: float = 1e-5
    scale_lr: float = 1e-4
    local_loss_weight: float = 1.0


@dataclass
class FinetuneSettings:
    stages: list[StageSpec]
    seed: int = 0
    checkpoint_every: int = 50
    loss: str = "quest"  # quest: local + final MSE of the stages' layers; blockwise: quest.blockwise

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


TEMPORAL_LAYERS = ["*time_emb_proj"]
ATTENTION_LAYERS = ["*ff.net.*"]
CLASS_CONDITIONAL_ATTENTION = ["*attn1.to_q", "*attn2.to_q", "*attn1.to_k", "*attn1.to_v"]


def default_stages(class_conditional: bool) -> list[StageSpec]:
    """QuEST's defaults (weights lr 1e-5, scales lr 1e-4, Adam)."""
    stage2_weights = ATTENTION_LAYERS + (CLASS_CONDITIONAL_ATTENTION if class_conditional else [])
    return [
        StageSpec("temporal", weights=list(TEMPORAL_LAYERS), scales=[p + ".*" for p in TEMPORAL_LAYERS]),
        StageSpec("critical", weights=stage2_weights, scales=["*"], exclude_scales=[p + ".*" for p in TEMPORAL_LAYERS]),
    ]


def blockwise_stages() -> list[StageSpec]:
    """Block-wise distillation: one stage, every quantized layer's weights and every activation
    scale, as many steps as QuEST's two stages together, QuEST's learning rates."""
    return [StageSpec("blockwise", weights=["*"], scales=["*"], steps=300)]


def settings_from_recipe(finetune: dict[str, Any], class_conditional: bool) -> FinetuneSettings:
    """Recipe ``finetune:`` block -> settings. Stage entries override the defaults by name;
    ``only: [temporal]`` keeps a subset (ablations); ``loss: blockwise`` swaps QuEST's stages
    for block-wise distillation."""
    finetune = dict(finetune or {})
    loss = finetune.get("loss", "quest")
    if loss not in FINETUNE_LOSSES:
        raise QuantConfigError(f"recipe finetune.loss must be one of {', '.join(FINETUNE_LOSSES)}, got {loss!r}")
    defaults = blockwise_stages() if loss == "blockwise" else default_stages(class_conditional)
    stages = {s.name: s for s in defaults}
    other = {s.name for s in (default_stages(class_conditional) if loss == "blockwise" else blockwise_stages())}
    for override in finetune.pop("stages", []) or []:
        override = dict(override)
        name = override.get("name")
        if name in other:
            continue  # the recipe tunes the other loss's stages
        base = stages.get(name)
        try:
            stages[name] = StageSpec(**{**(asdict(base) if base else {}), **override})
        except TypeError as exc:
            raise QuantConfigError(f"recipe finetune stage {name!r}: {exc}") from None
    only = finetune.pop("only", None) or list(stages)
    unknown = [n for n in only if n not in stages]
    if unknown:
        raise QuantConfigError(f"recipe finetune.only names unknown stages {unknown}; known: {', '.join(stages)}")
    chosen = [stages[n] for n in only]
    try:
        return FinetuneSettings(stages=chosen, **finetune)
    except TypeError as exc:
        raise QuantConfigError(f"recipe finetune block: {exc}") from None


@dataclass
class GroupingSearch:
    """Settings of the differentiable search (cheap: about a third of a QuEST finetune)."""

    steps: int = 100
    batch_size: int = 32
    logit_lr: float = 0.05
    scale_lr: float = 1e-2  # on log-scales
    tau_start: float = 1.0
    tau_end: float = 0.05
    prior: float = 1.0  # initial logit bonus of each timestep's uniform group
    seed: int = 0


def grouping_search_from_recipe(block: dict[str, Any] | None, seed: int = 0) -> GroupingSearch:
    """Recipe ``grouping_search:`` block -> settings (unknown keys and bad values refused)."""
    block = dict(block or {})
    unknown = sorted(set(block) - {f.name for f in fields(GroupingSearch)})
    if unknown:
        raise QuantConfigError(f"recipe grouping_search has unknown keys: {', '.join(unknown)}")
    try:
        return GroupingSearch(**{"seed": seed, **block})
    except TypeError as exc:
        raise QuantConfigError(f"recipe grouping_search: {exc}") from None
