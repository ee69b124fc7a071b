"""Engine directory ``manifest.json``: backend, device, shapes, precision, content hashes.

Loading re-hashes every file and checks backend and device before anything runs, so a damaged,
edited or foreign engine is refused with one clear line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quest_export.artifacts import check_fields, sha256_file, verify_document
from quest_export.errors import UserError

FORMAT = "quest-engine/1"
MANIFEST = "manifest.json"


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size} for name in names}


def read_engine_manifest(directory: Path) -> dict[str, Any]:
    """Parse and verify an engine directory (files present, hashes equal); no backend check."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"engine directory {directory} does not exist; build it with quest-export build-engine")
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory} has no {MANIFEST}; it is not an engine directory (build it with quest-export build-engine)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; rebuild the engine") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} manifest; rebuild the engine")
    check_fields(manifest, {"backend": str, "files": dict, "unet_config": dict, "profile": dict}, path, "rebuild the engine")
    verify_document(manifest, path, "rebuild the engine (quest-export build-engine --force)")
    for name, entry in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise UserError(f"engine file {file} is missing; rebuild the engine")
        if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            raise UserError(f"engine file {file} does not match the hash in {MANIFEST}; it was damaged or edited, rebuild the engine")
    return manifest


def check_backend(manifest: dict[str, Any], backend: str | None) -> None:
    if backend is not None and manifest["backend"] != backend:
        raise UserError(
            f"the engine was built for backend {manifest['backend']!r}, not {backend!r}; "
            f"run it with that backend or rebuild with build-engine --backend {backend}"
        )
