"""Engine build profiles (``engines/*.yaml``): the shape ranges an engine accepts and build knobs.

The same ranges become TensorRT optimization profiles and the runtime's input check, so a shape
outside the profile is refused before any compute, with the profile's own numbers in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from quest_export.errors import UserError

ENGINES_DIR = Path(__file__).resolve().parents[2] / "engines"


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def check(self, what: str) -> None:
        if not (isinstance(self.min, int) and isinstance(self.opt, int) and isinstance(self.max, int)):
            raise UserError(f"build profile: {what} min/opt/max must be integers")
        if not 1 <= self.min <= self.opt <= self.max:
            raise UserError(f"build profile: {what} needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max


@dataclass(frozen=True)
class BuildProfile:
    name: str
    batch: Range
    latent: Range
    tokens: Range
    optimization_level: int = 3
    workspace_mib: int = 1024
    timing_cache: str | None = None
    ort: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "batch": vars(self.batch), "latent": vars(self.latent), "tokens": vars(self.tokens),
            "optimization_level": self.optimization_level, "workspace_mib": self.workspace_mib,
            "timing_cache": self.timing_cache, "ort": dict(self.ort),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildProfile":
        try:
            profile = cls(
                name=str(data["name"]),
                batch=Range(**data["batch"]), latent=Range(**data["latent"]), tokens=Range(**data["tokens"]),
                optimization_level=int(data.get("optimization_level", 3)),
                workspace_mib=int(data.get("workspace_mib", 1024)),
                timing_cache=data.get("timing_cache"),
                ort=dict(data.get("ort") or {}),
            )
        except (KeyError, TypeError) as exc:
            raise UserError(f"build profile is missing or has a malformed field ({exc}); see engines/digits.yaml") from None
        for what, value in (("batch", profile.batch), ("latent", profile.latent), ("tokens", profile.tokens)):
            value.check(what)
        if not 0 <= profile.optimization_level <= 5:
            raise UserError("build profile: optimization_level must be 0-5")
        return profile

    def shapes(self, in_channels: int, hidden: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """min/opt/max input shapes (TensorRT optimization profile)."""
        def three(fn):
            return tuple(fn(k) for k in ("min", "opt", "max"))

        return {
            "sample": three(lambda k: (getattr(self.batch, k), in_channels, getattr(self.latent, k), getattr(self.latent, k))),
            "timestep": three(lambda k: (getattr(self.batch, k),)),
            "encoder_hidden_states": three(lambda k: (getattr(self.batch, k), getattr(self.tokens, k), hidden)),
        }

    def check_inputs(self, batch: int, height: int, width: int, tokens: int) -> None:
        """Refuse shapes the engine was not built for (before any compute)."""
        problems = []
        if not self.batch.contains(batch):
            problems.append(f"batch {batch} (profile {self.batch.min}-{self.batch.max})")
        for what, value in (("height", height), ("width", width)):
            if not self.latent.contains(value):
                problems.append(f"latent {what} {value} (profile {self.latent.min}-{self.latent.max})")
        if not self.tokens.contains(tokens):
            problems.append(f"{tokens} text tokens (profile {self.tokens.min}-{self.tokens.max})")
        if problems:
            raise UserError(
                f"input outside the engine's build profile {self.name!r}: {', '.join(problems)}; "
                "rebuild with a profile that covers it (build-engine --profile FILE)"
            )


def load_profile(name_or_path: str | Path) -> BuildProfile:
    """``digits`` -> ``engines/digits.yaml``; or a path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = ENGINES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in ENGINES_DIR.glob("*.yaml")))
        raise UserError(f"build profile {name_or_path} not found; use one of: {known}, or a YAML file path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"build profile {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"build profile {path} must be a mapping")
    return BuildProfile.from_dict(data)
