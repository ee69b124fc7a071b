"""Resolve ``--model`` to a diffusers pipeline.

Accepted: ``digits`` (shipped in the package), the aliases ``sd14``/``sd15``/``sdxl``, a local
diffusers directory, or a Hugging Face hub id. Local copies and the HF cache are tried before the
hub; offline with no local copy is a one-line user error that says how to pass a local directory.
"""

from __future__ import annotations

import json
import os
import sys
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from quest_export.errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_DIR = ASSETS / "digits"
DIGIT_CLASSIFIER_DIR = ASSETS / "digit_classifier"

SD_ALIASES: dict[str, str] = {
    "sd14": "CompVis/stable-diffusion-v1-4",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}

SD15_SHAPED = "sd15-shaped"  # SD1.5's UNet config with seeded random weights, built on first use (models/sd_shaped.py)
SHIPPED = ("digits", SD15_SHAPED)  # models the package carries or builds: checkpoints name them, not their path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Family = Literal["digits", "diffusers"]


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from, before anything is loaded."""

    name: str
    family: Family
    source: str
    is_local: bool

    @property
    def path(self) -> Path:
        return Path(self.source)


@dataclass
class LoadedModel:
    """A loaded pipeline and what it is."""

    spec: ModelSpec
    pipeline: Any

    @property
    def traits(self):
        """The model family's facts (models/family.py)."""
        from quest_export.models.family import family

        return family(self.spec.family)

    @property
    def reload_name(self) -> str:
        """What ``load_model`` takes to load this model again (a shipped model by its name)."""
        return self.spec.name if self.traits.shipped else self.spec.source

    @cached_property
    def content_hash(self) -> str | None:
        """sha256 over the UNet folder of a local model (None for hub models resolved remotely)."""
        from quest_export.artifacts import sha256_tree

        unet_dir = self.spec.path / "unet"
        return sha256_tree(unet_dir) if self.spec.is_local and unet_dir.is_dir() else None


def _local_family(path: Path) -> Family:
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(
            f"{path} is not a diffusers model directory (no model_index.json); "
            "pass a folder written by save_pretrained, or one of: digits, sd15-shaped, " + ", ".join(SD_ALIASES)
        )
    try:
        class_name = json.loads(index.read_text()).get("_class_name", "")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{index} is not valid JSON; re-save the model with save_pretrained") from None
    return "digits" if class_name == "DigitsPipeline" else "diffusers"


def source_of(model_info: dict[str, Any]) -> str:
    """What ``load_model`` takes for a model recorded in a checkpoint as ``{"name", "source"}``:
    a shipped model by its name (its path differs between installs), any other by its source."""
    return model_info["name"] if model_info["name"] in SHIPPED else model_info["source"]


def resolve_model_spec(name: str) -> ModelSpec:
    """Turn a ``--model`` value into a :class:`ModelSpec` without loading weights."""
    if name == "digits":
        if not (DIGITS_DIR / "model_index.json").is_file():
            raise UserError(
                f"the shipped digits model is missing from {DIGITS_DIR}; reinstall the package "
                "or recreate it with `quest-export train-demo --out quest_export/assets --force`"
            )
        return ModelSpec(name, "digits", str(DIGITS_DIR), True)
    if name in SD_ALIASES:
        return ModelSpec(name, "diffusers", SD_ALIASES[name], False)
    if name == SD15_SHAPED:
        from quest_export.models.sd_shaped import sd15_shaped_dir

        return ModelSpec(name, "diffusers", str(sd15_shaped_dir(build=False)), True)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {name} is a file; pass a diffusers model directory")
        return ModelSpec(name, _local_family(path), str(path.resolve()), True)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if _HUB_ID.match(name) and not looks_like_path:
        return ModelSpec(name, "diffusers", name, False)
    if looks_like_path:
        raise UserError(f"model directory {name} does not exist; check the path or pass one of: digits, " + ", ".join(SD_ALIASES))
    raise UserError(
        f"unknown model {name!r}; pass digits, {', '.join(SD_ALIASES)}, a local diffusers directory, "
        "or a Hugging Face id such as org/name"
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _load_diffusers(source: str, local_only: bool, **kwargs: Any) -> Any:
    from diffusers import DiffusionPipeline

    # tensors only from safetensors: a folder or repo with only pickled .bin weights is refused
    return DiffusionPipeline.from_pretrained(source, local_files_only=local_only, use_safetensors=True, **kwargs)


def load_model(name: str, device: str = "cpu") -> LoadedModel:
    """Load the pipeline that ``name`` refers to, on ``device``, in float32."""
    from diffusers.utils import logging as diffusers_logging

    spec = resolve_model_spec(name)
    if spec.name == SD15_SHAPED:
        from quest_export.models.sd_shaped import sd15_shaped_dir

        sd15_shaped_dir(build=True, log=lambda line: print(line, file=sys.stderr))
    diffusers_logging.disable_progress_bar()
    try:
        return _load(spec, device)
    finally:
        diffusers_logging.enable_progress_bar()


def _load(spec: ModelSpec, device: str) -> LoadedModel:
    if spec.family == "digits":
        from quest_export.pipelines.digits import DigitsPipeline

        try:
            pipe = DigitsPipeline.from_pretrained(spec.source, use_safetensors=True)
        except Exception as exc:  # noqa: BLE001 - damaged weights raise library-specific errors
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot load the digits model from {spec.source}: {first.rstrip('. ')}; "
                            "its files are damaged or incomplete: re-save it (train-demo) or reinstall the package") from None
        return LoadedModel(spec, pipe.to(device))
    if spec.is_local:
        try:
            pipe = _load_diffusers(spec.source, local_only=True)
        except Exception as exc:  # noqa: BLE001 - damaged weights raise library-specific errors
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"cannot load diffusers model from {spec.source}: {first.rstrip('. ')}; "
                "check that the folder is complete (save_pretrained with safetensors weights) or re-download it"
            ) from None
        return LoadedModel(spec, pipe.to(device))
    try:
        pipe = _load_diffusers(spec.source, local_only=True)
    except Exception:  # noqa: BLE001 - any cache miss falls through to the hub
        pipe = None
    if pipe is None:
        if spec.name in SD_ALIASES:
            what = f"model {spec.name!r} ({spec.source}) is not in the local Hugging Face cache"
        else:  # an org/name that is not a local folder either
            what = f"model {spec.name!r} is neither a local directory nor in the local Hugging Face cache"
        hint = (
            what
            + (" and HF_HUB_OFFLINE is set" if _hub_offline() else " and could not be downloaded")
            + f"; download it where the hub is reachable (huggingface-cli download {spec.source}) "
            "and pass the folder with --model /path/to/dir"
        )
        if _hub_offline():
            raise UserError(hint)
        try:
            pipe = _load_diffusers(spec.source, local_only=False)
        except Exception:  # noqa: BLE001 - network, auth and missing-repo errors all mean the same to the user
            raise UserError(hint) from None
    return LoadedModel(spec, pipe.to(device))
