"""Collect eval JSON files into one markdown results table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quest_export.errors import UserError

COLUMNS = (("method", "method"), ("bits", "bits"), ("target", "target"), ("fid", "FID"), ("label_accuracy", "label acc."), ("psnr_vs_fp", "PSNR vs FP (dB)"))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def results_table(paths: list[Path]) -> str:
    rows = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read eval JSON {path}: {exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} is not an eval JSON object (write one with quest-export eval --json)")
        for key in ("fid", "label_accuracy", "psnr_vs_fp", "fid_real_floor"):
            value = data.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(f"{path}: {key!r} must be a number or null, not {type(value).__name__}")
        data.setdefault("method", "fp")
        data.setdefault("bits", "fp32")
        rows.append(data)
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |" for row in rows]
    floor = next((row.get("fid_real_floor") for row in rows if row.get("fid_real_floor") is not None), None)
    footer = [f"\nfid_real_floor (held-out real digits vs reference): {floor:.3f}"] if floor is not None else []
    return "\n".join([header, rule, *body, *footer])
