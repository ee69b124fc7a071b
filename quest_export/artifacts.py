"""Atomic artifact writing and content hashing.

Every file a command produces is written to a temporary path in the destination directory and
renamed into place only when complete, so an interrupted or failing command never leaves a
half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quest.documents import (  # noqa: F401 - shared with quest/
    DOCUMENT_HASH,
    document_sha256,
    seal_document,
    sha256_file,
    verify_document,
)
from quest_export.errors import UserError
from quest_export.interrupts import stop_if_requested


def check_writable_file(path: Path, force: bool = True) -> Path:
    """Validate an output file path before any long work starts.

    The parent directory is created if it is missing; it must be writable. With ``force=False`` an
    existing file is refused.
    """
    path = Path(path)
    if path.exists() and path.is_dir():
        raise UserError(f"output path {path} is a directory; pass a file path such as {path / 'out.png'}")
    if path.exists() and not force:
        raise UserError(f"output {path} already exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {parent}: {exc.strerror}; choose another --out") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output directory {parent} is not writable; choose another --out")
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove what interrupted writers of ``path`` left beside it (hidden ``.<name>.XXXXXXXX.tmp``
    files/directories, ``.old`` directories of a replacement, finetuning-state temporaries).

    Only call this while holding ``path``'s output lock (:mod:`quest_export.locking`): then no live
    process is writing any of them. Returns what was removed.
    """
    path = Path(path)
    name = re.escape(path.name)
    pattern = re.compile(
        rf"^\.{name}\.[a-z0-9_]{{8}}\.(tmp|tmp{re.escape(path.suffix)}|old)$"
        rf"|^\.\.{name}\.finetune-state\.safetensors\.\d+\.tmp$"
    )
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    if not path.exists():
        # killed between the two renames of a --force replacement: the previous artifact is in
        # .<name>.XXXXXXXX.old/x; put it back rather than lose both versions
        for sibling in siblings:
            if sibling.name.endswith(".old") and pattern.match(sibling.name) and (sibling / "x").exists():
                os.replace(sibling / "x", path)
                break
    for sibling in siblings:
        if not pattern.match(sibling.name):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the artifact gets the usual mode
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        stop_if_requested()  # a signal whose raise was swallowed still stops the commit
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only when the block succeeds."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"output directory {path} already exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the artifact gets the usual mode
    try:
        yield tmp
        stop_if_requested()
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_tree(root: Path) -> str:
    """Content hash of a directory: file paths and contents, in sorted order."""
    digest = hashlib.sha256()
    root = Path(root)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


# -- JSON documents: structure checks and a content hash of the document itself ---------------

_KIND_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true/false"}


def _kind_ok(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def check_fields(doc: Any, fields: dict[str, Any], path: Path, fix: str, where: str = "") -> None:
    """A small schema check: ``fields`` maps keys to a type, a tuple of types, or a nested ``fields``
    dict (an object with those keys). Missing keys and wrong types are one clear UserError."""
    if not isinstance(doc, dict):
        raise UserError(f"{path}{where} is not a JSON object; {fix}")
    for key, kind in fields.items():
        label = f"{where}.{key}" if where else key
        if key not in doc:
            raise UserError(f"{path} lacks {label!r}; {fix}")
        value = doc[key]
        if isinstance(kind, dict):
            check_fields(value, kind, path, fix, label)
        elif not _kind_ok(value, kind):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            expected = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds if k is not type(None)) or "null"
            raise UserError(f"{path}: {label!r} must be {expected}, not {type(value).__name__}; {fix}")


def read_json_document(path: Path, fields: dict[str, Any], fix: str) -> dict[str, Any]:
    """Read a JSON metadata file, check its structure and its content hash; one UserError otherwise."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; {fix}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; {fix}") from None
    check_fields(doc, fields, path, fix)
    verify_document(doc, path, fix)
    return doc
