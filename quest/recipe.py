"""Quantization recipes: bit-widths, per-layer exceptions, calibration and PTQ settings.

A recipe is a YAML file (``recipes/<model>-<bits>.yaml``) or the built-in defaults; ``--bits wXaY``
sets the default widths and rules override them per layer by glob pattern over module names.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from quest.errors import QuantConfigError
from quest.recipe_blocks import FINETUNE_LOSSES, FinetuneBlock, GroupingSearch  # noqa: F401 - FINETUNE_LOSSES: CLI choices

_BITS = re.compile(r"^w(\d+)a(\d+)$")
ACT_INIT_METHODS = ("minmax", "percentile", "mse")
GROUPINGS = ("uniform", "searched")  # timestep -> group lookup: equal intervals, or quest.grouping's search
STEP_SELECTIONS = ("uniform", "selected")  # calibration rows: trajectory x_t, or quest.calibration_steps


def parse_bits(bits: str) -> tuple[int, int]:
    """``'w4a8'`` -> ``(4, 8)``; 2 to 8 bits each."""
    match = _BITS.match(bits.strip().lower())
    if not match:
        raise QuantConfigError(f"--bits {bits!r} is not of the form wXaY (for example w4a8, w8a8)")
    w, a = int(match.group(1)), int(match.group(2))
    for value, what in ((w, "weight"), (a, "activation")):
        if not 2 <= value <= 8:
            raise QuantConfigError(f"--bits {bits}: {what} bits must be between 2 and 8, got {value}")
    return w, a


@dataclass
class LayerRule:
    """Override for the layers whose module name matches ``pattern`` (fnmatch glob)."""

    pattern: str
    weight_bits: int | None = None
    act_bits: int | None = None
    quantize: bool = True


@dataclass
class CalibrationSettings:
    """How the calibration set is recorded along the FP model's own trajectories."""

    trajectories: int = 64
    steps: int = 20
    guidance: float | None = None
    seed: int = 1234
    step_selection: str = "uniform"
    prompts: list[str] = field(default_factory=lambda: ["a photograph of a city street", "a bowl of fruit on a table"])


@dataclass
class Recipe:
    """Everything that decides how a model is quantized (except the weights themselves)."""

    name: str = "default"
    weight_bits: int = 8
    act_bits: int = 8
    softmax_bits: int = 8
    attention_bits: int | None = None  # q, k, v; defaults to act_bits
    target: str = "onnxruntime"
    timestep_groups: int = 4
    activation_init: str = "mse"
    percentile: float = 99.99
    split_shortcut: bool = False
    activation_symmetric: bool | None = None  # None: the target's own choice
    activation_per_channel: bool = False
    quantize_attention: bool = True
    grouping: str = "uniform"
    grouping_search: GroupingSearch = field(default_factory=GroupingSearch)  # grouping: searched settings
    weight_dilation: bool = False  # fold quest.dilation's exact channel rescale into the FP model first
    # SmoothQuant-style channel smoothing (quest.dilation's folds, factors amax^a / wmax^(1-a)); None: off
    smoothing_alpha: float | None = None
    # MixDQ-style mixed precision: this many most activation-sensitive layers keep 8-bit activations
    # (quest.mixed_precision); act8_selected records the layers once measured
    act8_layers: int = 0
    act8_rows: int = 128  # calibration rows (stratified over timesteps) each layer's measurement runs
    act8_selected: list[str] = field(default_factory=list)
    layers: list[LayerRule] = field(default_factory=list)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    finetune: FinetuneBlock = field(default_factory=FinetuneBlock)  # QuEST stages (resolved per model)

    @property
    def bits(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        data = dict(data)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known - {"bits", "model"})
        if unknown:
            raise QuantConfigError(f"recipe has unknown keys: {', '.join(unknown)}")
        if "bits" in data:
            data["weight_bits"], data["act_bits"] = parse_bits(str(data.pop("bits")))
        data.pop("model", None)
        try:
            data["layers"] = [LayerRule(**rule) for rule in data.get("layers") or []]
            data["calibration"] = CalibrationSettings(**(data.get("calibration") or {}))
            data["grouping_search"] = _block(GroupingSearch, data.get("grouping_search"))
            data["finetune"] = _block(FinetuneBlock, data.get("finetune"))
            recipe = cls(**data)
        except TypeError as exc:
            raise QuantConfigError(f"invalid recipe: {exc}") from None
        recipe.validate()
        return recipe

    def validate(self) -> None:
        for value, what in (
            (self.weight_bits, "weight_bits"),
            (self.act_bits, "act_bits"),
            (self.softmax_bits, "softmax_bits"),
            (self.attention_bits or self.act_bits, "attention_bits"),
        ):
            if not isinstance(value, int) or not 2 <= value <= 8:
                raise QuantConfigError(f"recipe {self.name}: {what} must be an integer from 2 to 8, got {value!r}")
        for rule in self.layers:
            for value in (rule.weight_bits, rule.act_bits):
                if value is not None and not 2 <= value <= 8:
                    raise QuantConfigError(f"recipe rule {rule.pattern!r}: bits must be 2-8, got {value}")
        if self.activation_init not in ACT_INIT_METHODS:
            raise QuantConfigError(f"activation_init must be one of {', '.join(ACT_INIT_METHODS)}")
        if self.timestep_groups < 1:
            raise QuantConfigError("timestep_groups must be >= 1")
        for value, what, choices in (
            (self.grouping, "grouping", GROUPINGS),
            (self.calibration.step_selection, "calibration.step_selection", STEP_SELECTIONS),
        ):
            if value not in choices:
                raise QuantConfigError(f"recipe {self.name}: {what} must be one of {', '.join(choices)}, got {value!r}")
        try:  # also when a caller replaced the block (--loss, --stages)
            self.finetune.validate()
        except QuantConfigError as exc:
            raise QuantConfigError(f"recipe {self.name}: {str(exc).removeprefix('recipe ')}") from None
        if self.smoothing_alpha is not None:
            if isinstance(self.smoothing_alpha, bool) or not isinstance(self.smoothing_alpha, (int, float)) or not 0.0 < self.smoothing_alpha < 1.0:
                raise QuantConfigError(f"recipe {self.name}: smoothing_alpha must be a number between 0 and 1 (0.5 is SmoothQuant's), got {self.smoothing_alpha!r}")
            if self.weight_dilation:
                raise QuantConfigError(f"recipe {self.name}: smoothing_alpha and weight_dilation rescale the same channels; use one of them")
        for value, what, least in ((self.act8_layers, "act8_layers", 0), (self.act8_rows, "act8_rows", 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise QuantConfigError(f"recipe {self.name}: {what} must be a whole number >= {least}, got {value!r}")
        if not isinstance(self.weight_dilation, bool):
            raise QuantConfigError(f"recipe {self.name}: weight_dilation must be true or false, got {self.weight_dilation!r}")


def _block(kind, value):
    """A typed recipe block from its YAML / JSON form (a block already typed passes through)."""
    return value if isinstance(value, kind) else kind.from_dict(value)


def recipes_dir() -> Path:
    """The repository's top-level ``recipes/`` folder."""
    return Path(__file__).resolve().parent.parent / "recipes"


def load_recipe(model: str, bits: str, recipe_path: Path | None = None) -> Recipe:
    """The recipe for ``model`` at ``bits``: ``recipe_path`` if given, else
    ``recipes/<model>-<bits>.yaml`` if it exists, else the defaults. ``--bits`` always wins."""
    weight_bits, act_bits = parse_bits(bits)
    path = recipe_path
    if path is None:
        candidate = recipes_dir() / f"{model}-{bits.lower()}.yaml"
        path = candidate if candidate.is_file() else None
    if path is None:
        recipe = Recipe(name=f"default-{bits.lower()}", weight_bits=weight_bits, act_bits=act_bits)
        recipe.validate()
        return recipe
    path = Path(path)
    if not path.is_file():
        raise QuantConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise QuantConfigError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise QuantConfigError(f"recipe {path} must be a mapping")
    data.setdefault("name", path.stem)
    data["bits"] = bits
    return Recipe.from_dict(data)
