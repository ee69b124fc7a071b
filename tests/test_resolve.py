"""`--model` resolution: shipped demo, aliases, local directories, hub ids, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from quest_export.errors import UserError
from quest_export.models.resolve import DIGITS_DIR, SD_ALIASES, resolve_model_spec


def test_digits_resolves_to_shipped_directory() -> None:
    spec = resolve_model_spec("digits")
    assert spec.family == "digits" and spec.is_local and Path(spec.source) == DIGITS_DIR


@pytest.mark.parametrize("alias", sorted(SD_ALIASES))
def test_sd_aliases_resolve_to_hub_ids(alias: str) -> None:
    spec = resolve_model_spec(alias)
    assert spec.source == SD_ALIASES[alias] and not spec.is_local and spec.family == "diffusers"


def test_hub_id_passes_through() -> None:
    spec = resolve_model_spec("someorg/some-model")
    assert spec.source == "someorg/some-model" and not spec.is_local


def test_local_sd_directory(tiny_sd_dir: Path) -> None:
    spec = resolve_model_spec(str(tiny_sd_dir))
    assert spec.is_local and spec.family == "diffusers"


def test_local_digits_copy_is_recognised_by_pipeline_class(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(DIGITS_DIR, tmp_path / "mydigits")
    assert resolve_model_spec(str(tmp_path / "mydigits")).family == "digits"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nosuch", "unknown model"),
        ("./missing/dir", "does not exist"),
        ("/abs/missing/dir", "does not exist"),
    ],
)
def test_refusals(name: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_model_spec(name)


def test_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model_spec(str(tmp_path / "f"))
