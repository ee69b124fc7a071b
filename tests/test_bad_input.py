"""Bad input: one clear line, non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

from pathlib import Path

from conftest import assert_one_line_error


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if "hf_home" not in p.parts}


def test_unknown_model(run_cli, tmp_path: Path) -> None:
    result = run_cli("generate", "--model", "nosuchmodel", "--out", tmp_path / "g.png")
    assert_one_line_error(result, 2, "unknown model 'nosuchmodel'")
    assert not (tmp_path / "g.png").exists()


def test_missing_model_directory(run_cli, tmp_path: Path) -> None:
    result = run_cli("eval", "--model", tmp_path / "missing" / "dir", "--num-samples", "2")
    assert_one_line_error(result, 2, "does not exist")


def test_directory_without_model_index(run_cli, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli("generate", "--model", tmp_path / "empty", "--out", tmp_path / "g.png")
    assert_one_line_error(result, 2, "no model_index.json")


def test_corrupt_model_index(run_cli, tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_index.json").write_text("{not json")
    result = run_cli("generate", "--model", tmp_path / "bad", "--out", tmp_path / "g.png")
    assert_one_line_error(result, 2, "not valid JSON")


def test_offline_alias_without_cache_names_model_and_fix(run_cli, tmp_path: Path) -> None:
    result = run_cli("generate", "--model", "sd15", "--out", tmp_path / "g.png", env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, 2, "sd15")
    assert "--model /path/to/dir" in result.stderr
    assert not (tmp_path / "g.png").exists()


def test_zero_steps_is_a_usage_error(run_cli, tmp_path: Path) -> None:
    result = run_cli("generate", "--steps", "0", "--out", tmp_path / "g.png")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--steps" in result.stderr
    assert not (tmp_path / "g.png").exists()


def test_negative_num_samples_is_a_usage_error(run_cli, tmp_path: Path) -> None:
    result = run_cli("eval", "--num-samples", "-1", "--json", tmp_path / "e.json")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--num-samples" in result.stderr
    assert not (tmp_path / "e.json").exists()


def test_unwritable_out_parent_is_a_file(run_cli, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    before = _files(tmp_path)
    result = run_cli("generate", "--out", tmp_path / "afile" / "grid.png")
    assert_one_line_error(result, 2, "cannot create output directory")
    assert _files(tmp_path) == before


def test_out_is_a_directory(run_cli, tmp_path: Path) -> None:
    result = run_cli("eval", "--json", tmp_path, "--num-samples", "2")
    assert_one_line_error(result, 2, "is a directory")


def test_out_must_be_png(run_cli, tmp_path: Path) -> None:
    result = run_cli("generate", "--out", tmp_path / "grid.jpg")
    assert_one_line_error(result, 2, ".png")


def test_label_out_of_range(run_cli, tmp_path: Path) -> None:
    result = run_cli("generate", "--label", "10", "--out", tmp_path / "g.png")
    assert result.returncode == 2 and "--label" in result.stderr and "Traceback" not in result.stderr


def test_prompt_on_digits_model(run_cli, tmp_path: Path) -> None:
    result = run_cli("generate", "--prompt", "a cat", "--out", tmp_path / "g.png")
    assert_one_line_error(result, 2, "--label")


def test_label_on_text_model(run_cli, tmp_path: Path, tiny_sd_dir: Path) -> None:
    result = run_cli("generate", "--model", tiny_sd_dir, "--label", "3", "--out", tmp_path / "g.png")
    assert_one_line_error(result, 2, "--prompt")


def test_train_demo_refuses_existing_output(run_cli, tmp_path: Path) -> None:
    (tmp_path / "td" / "digits").mkdir(parents=True)
    result = run_cli("train-demo", "--out", tmp_path / "td", "--unet-steps", "1")
    assert_one_line_error(result, 2, "--force")
