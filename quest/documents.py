"""Content hashes for the files the algorithm writes (checkpoints), shared with ``quest_export``'s
artifacts: a file hash, and a sealed JSON document whose later edits are detected."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from quest.errors import UserError

DOCUMENT_HASH = "document_sha256"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Content hash of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def document_sha256(doc: dict[str, Any]) -> str:
    """sha256 of a JSON document's canonical text, without its own ``document_sha256`` field."""
    body = json.loads(json.dumps({k: v for k, v in doc.items() if k != DOCUMENT_HASH}))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_document(doc: dict[str, Any]) -> dict[str, Any]:
    """Add ``document_sha256`` to ``doc`` (in place) so that any later edit of the file is detected."""
    doc[DOCUMENT_HASH] = document_sha256(doc)
    return doc


def verify_document(doc: dict[str, Any], path: Path, fix: str) -> None:
    """Refuse a sealed document whose content no longer matches its hash (documents written before
    sealing existed carry no hash and pass)."""
    recorded = doc.get(DOCUMENT_HASH)
    if recorded is not None and recorded != document_sha256(doc):
        raise UserError(f"{path} was edited after it was written (content hash mismatch); {fix}")
