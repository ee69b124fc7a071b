"""Quantized checkpoint: ``quant.safetensors`` (UNet weights, quantizer parameters, timestep lookup)
plus ``quant.json`` (model identity, bits, recipe, target, timestep grid, layer map, versions).

Loading rebuilds the quantized UNet from the FP model and the recipe, then restores every tensor,
reproducing the saved model's outputs exactly. The JSON records the tensor file's sha256, which is
checked before anything is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quest.version import __version__
from quest.documents import seal_document, sha256_file, verify_document
from quest.errors import QuantConfigError
from quest.quantize import QuantizedUNet, quantize_unet
from quest.recipe import Recipe

FORMAT = "quest-checkpoint/1"
TENSORS = "quant.safetensors"
META = "quant.json"


def _versions() -> dict[str, str]:
    import diffusers

    return {"quest_export": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def tensors_for_file(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """``state`` as safetensors writes it: CPU tensors (a file made on a GPU loads anywhere), copied
    only where two entries share storage (safetensors refuses that), not wholesale: a full-size
    SD UNet is 3.4 GB, and a blanket copy would add that much to the peak memory of every save."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[prefix + key] = tensor
    return out


def save_checkpoint(directory: Path, qunet: QuantizedUNet, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the checkpoint files into ``directory`` (the caller makes the directory atomic)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = tensors_for_file(qunet.unet.state_dict())
    save_file(state, str(directory / TENSORS), metadata={"format": FORMAT})
    lookup = qunet.context.lookup.tolist()
    starts = [t for t in range(len(lookup)) if t == 0 or lookup[t] != lookup[t - 1]]
    document = {
        "format": FORMAT,
        **meta,
        "bits": qunet.recipe.bits,
        "target": qunet.profile.name,
        "target_revision": qunet.profile.revision,
        "recipe": qunet.recipe.to_dict(),
        "timestep_grid": {
            "num_train_timesteps": len(lookup),
            "num_groups": qunet.context.num_groups,
            "grouping": qunet.recipe.grouping,
            # runs of equal group: run i covers [group_starts[i], group_starts[i+1]) and maps to
            # run_groups[i] (for uniform or searched contiguous groups, run_groups[i] == i)
            "group_starts": starts,
            "run_groups": [lookup[t] for t in starts],
        },
        "layers": qunet.layer_map(),
        "versions": _versions(),
        "tensors_sha256": sha256_file(directory / TENSORS),
    }
    (directory / META).write_text(json.dumps(seal_document(document), indent=2) + "\n")
    return document


def read_checkpoint_meta(directory: Path) -> dict[str, Any]:
    """Parse and sanity-check ``quant.json``; verify the tensor file's hash."""
    directory = Path(directory)
    meta_path, tensor_path = directory / META, directory / TENSORS
    if not meta_path.is_file() or not tensor_path.is_file():
        raise QuantConfigError(f"{directory} is not a quantized checkpoint (needs {META} and {TENSORS}); pass a directory written by quest-export finetune")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QuantConfigError(f"{meta_path} is not valid JSON; the checkpoint is damaged, re-create it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise QuantConfigError(f"{meta_path} is not a {FORMAT} file; pass a directory written by quest-export finetune")
    for key, kind in (("model", dict), ("recipe", dict), ("target", str), ("bits", str), ("tensors_sha256", str)):
        if key not in meta:
            raise QuantConfigError(f"{meta_path} lacks {key!r}; the checkpoint is damaged, re-create it")
        if not isinstance(meta[key], kind):
            raise QuantConfigError(f"{meta_path}: {key!r} must be {'an object' if kind is dict else 'a string'}; the checkpoint is damaged, re-create it")
    for key in ("name", "source"):
        if not isinstance(meta["model"].get(key), str):
            raise QuantConfigError(f"{meta_path}: 'model.{key}' must be a string; the checkpoint is damaged, re-create it")
    if sha256_file(tensor_path) != meta["tensors_sha256"]:
        raise QuantConfigError(f"{tensor_path} does not match the hash in {META}; the checkpoint is damaged or was edited, re-create it (quest-export finetune)")
    return meta


def load_checkpoint(directory: Path, unet: torch.nn.Module, meta: dict[str, Any] | None = None) -> QuantizedUNet:
    """Quantize the FP ``unet`` in place as the checkpoint says and restore its tensors."""
    meta = meta or read_checkpoint_meta(directory)
    from quest.profiles import get_profile
    # checked after the caller's model-identity check, which names the more specific problem
    verify_document(meta, Path(directory) / META, "re-create the checkpoint (quest-export finetune)")
    try:
        recipe = Recipe.from_dict(meta["recipe"])
    except (TypeError, KeyError, ValueError) as exc:
        if isinstance(exc, QuantConfigError):
            raise
        raise QuantConfigError(f"{Path(directory) / META}: the recipe cannot be read ({exc}); the checkpoint is damaged, re-create it") from None
    profile = get_profile(meta["target"])
    revision = meta.get("target_revision", 1)
    if revision != profile.revision:
        raise QuantConfigError(
            f"checkpoint {directory} was finetuned for revision {revision} of the {profile.name} target, whose arithmetic "
            f"this version no longer builds (now revision {profile.revision}); re-run quest-export finetune"
        )
    qunet = quantize_unet(unet, recipe, profile)
    try:
        state = load_file(str(Path(directory) / TENSORS))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise QuantConfigError(f"cannot read {Path(directory) / TENSORS}: {exc}") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise QuantConfigError(f"{Path(directory) / TENSORS}: tensor {name!r} contains NaN or Inf; re-create the checkpoint")
    try:
        missing, unexpected = qunet.unet.load_state_dict(state, strict=False)
    except RuntimeError:  # shape mismatches
        missing, unexpected = ["<shape mismatch>"], []
    if missing or unexpected:
        raise QuantConfigError(
            f"checkpoint {directory} does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected tensors); "
            "was it made from another model?"
        )
    return qunet
