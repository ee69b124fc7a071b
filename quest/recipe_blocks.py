"""Typed blocks of a recipe (the ``finetune:`` stages and the ``grouping_search:`` settings),
checked when the recipe loads rather than when a long job reaches them.

They live apart from :mod:`quest.finetune` and :mod:`quest.grouping` so that :mod:`quest.recipe`
can validate them without importing the modules that use a quantized UNet.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
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
    gradient_checkpointing: bool = False  # recompute UNet blocks in backward (the 64x64 attention scores are GBs)

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


def _known_keys(kind: type, block: dict[str, Any] | None, what: str) -> dict[str, Any]:
    """A copy of a recipe block whose keys are all fields of ``kind`` (else one clear error)."""
    block = dict(block or {})
    unknown = sorted(set(block) - {f.name for f in fields(kind)})
    if unknown:
        raise QuantConfigError(f"recipe {what} has unknown keys: {', '.join(unknown)}")
    return block


@dataclass
class StageOverride:
    """What a recipe says about one stage, by name; ``None`` keeps the default stage's value."""

    name: str
    weights: list[str] | None = None
    scales: list[str] | None = None
    exclude_scales: list[str] | None = None
    steps: int | None = None
    batch_size: int | None = None
    weight_lr: float | None = None
    scale_lr: float | None = None
    local_loss_weight: float | None = None

    def __post_init__(self) -> None:
        """Numbers are numbers by the time a long job reads them. YAML reads ``1e-4`` (no dot) as a
        string, which Adam would only reject after PTQ; it is taken as the number it spells."""
        for key in ("weight_lr", "scale_lr", "local_loss_weight"):
            value = getattr(self, key)
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise QuantConfigError(f"recipe finetune stage {self.name!r}: {key} must be a number, got {value!r}") from None
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise QuantConfigError(f"recipe finetune stage {self.name!r}: {key} must be a number >= 0, got {value!r}")
            setattr(self, key, None if value is None else float(value))
        for key, least in (("steps", 0), ("batch_size", 1)):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise QuantConfigError(f"recipe finetune stage {self.name!r}: {key} must be a whole number >= {least}, got {value!r}")

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class FinetuneBlock:
    """The recipe's ``finetune:`` block as written, typed and checked when the recipe loads. It
    becomes :class:`FinetuneSettings` once the model is known (its default stages depend on
    whether the model is class-conditional): :meth:`settings`."""

    loss: str = "quest"  # quest: local + final MSE of the stages' layers; blockwise: quest.blockwise
    seed: int = 0
    checkpoint_every: int = 50
    # recompute each UNet block's activations in backward instead of keeping them: a full-size SD
    # UNet's fake-quantized 64x64 attention keeps GBs per block for backward (quest loss only)
    gradient_checkpointing: bool = False
    only: list[str] | None = None  # keep these stages only (ablations)
    stages: list[StageOverride] = field(default_factory=list)

    @classmethod
    def from_dict(cls, block: dict[str, Any] | None) -> "FinetuneBlock":
        block = _known_keys(cls, block, "finetune block")
        stages = []
        for entry in block.pop("stages", None) or []:
            entry = dict(entry)
            try:
                stages.append(StageOverride(**entry))
            except TypeError as exc:
                raise QuantConfigError(f"recipe finetune stage {entry.get('name')!r}: {exc}") from None
        parsed = cls(stages=stages, **{k: v for k, v in block.items() if v is not None})
        parsed.validate()
        return parsed

    def validate(self) -> None:
        """The loss, stage names and stage values, checked now rather than when a long job reaches them."""
        if self.loss not in FINETUNE_LOSSES:
            raise QuantConfigError(f"recipe finetune.loss must be one of {', '.join(FINETUNE_LOSSES)}, got {self.loss!r}")
        if self.gradient_checkpointing and self.loss == "blockwise":
            raise QuantConfigError("recipe finetune.gradient_checkpointing works with loss: quest only (block-wise "
                                   "distillation already runs one block at a time); remove one of them")
        self.settings(class_conditional=True)

    def settings(self, class_conditional: bool) -> FinetuneSettings:
        """Stage entries override the defaults by name (entries for the other loss's stages are
        ignored); ``only`` keeps a subset; ``loss: blockwise`` swaps QuEST's stages for block-wise
        distillation."""
        defaults = blockwise_stages() if self.loss == "blockwise" else default_stages(class_conditional)
        stages = {s.name: s for s in defaults}
        other = {s.name for s in (default_stages(class_conditional) if self.loss == "blockwise" else blockwise_stages())}
        for override in self.stages:
            if override.name in other:
                continue
            base = stages.get(override.name)
            try:
                stages[override.name] = StageSpec(**{**(asdict(base) if base else {}), **override.given()})
            except TypeError as exc:
                raise QuantConfigError(f"recipe finetune stage {override.name!r}: {exc}") from None
        only = self.only or list(stages)
        unknown = [n for n in only if n not in stages]
        if unknown:
            raise QuantConfigError(f"recipe finetune.only names unknown stages {unknown}; known: {', '.join(stages)}")
        return FinetuneSettings(stages=[stages[n] for n in only], seed=self.seed, checkpoint_every=self.checkpoint_every,
                                loss=self.loss, gradient_checkpointing=bool(self.gradient_checkpointing))


def settings_from_recipe(finetune: FinetuneBlock | dict[str, Any] | None, class_conditional: bool) -> FinetuneSettings:
    """Recipe ``finetune:`` block (typed, or as written in YAML) -> settings for this model."""
    block = finetune if isinstance(finetune, FinetuneBlock) else FinetuneBlock.from_dict(finetune)
    return block.settings(class_conditional)


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
    seed: int | None = None  # None: the finetune block's seed

    @classmethod
    def from_dict(cls, block: dict[str, Any] | None) -> "GroupingSearch":
        """Recipe ``grouping_search:`` block (unknown keys and bad values refused)."""
        block = _known_keys(cls, block, "grouping_search")
        try:
            return cls(**block)
        except TypeError as exc:
            raise QuantConfigError(f"recipe grouping_search: {exc}") from None

    def with_seed(self, seed: int) -> "GroupingSearch":
        """The settings the search runs with: its own seed if the recipe gave one, else ``seed``."""
        return replace(self, seed=seed if self.seed is None else self.seed)

