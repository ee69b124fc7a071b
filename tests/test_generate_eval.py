"""`generate` and `eval` end to end through the console entry point."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def test_generate_digits_grid(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "grid.png"
    result = run_cli("generate", "--model", "digits", "--num-images", "10", "--steps", "5", "--seed", "1", "--out", out)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    # 10 columns of 16 px images with 1 px padding, upscaled 4x
    assert image.size == ((10 * 17 + 1) * 4, (1 * 17 + 1) * 4)
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temp files left


def test_generate_single_label(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "sevens.png"
    result = run_cli("generate", "--label", "7", "--num-images", "4", "--steps", "3", "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.is_file()


def test_eval_digits_json(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = run_cli("eval", "--model", "digits", "--num-samples", "20", "--steps", "4", "--seed", "0", "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    for key in ("model", "num_samples", "steps", "seed", "fid", "label_accuracy", "fid_real_floor"):
        assert key in data
    assert data["model"] == "digits" and data["num_samples"] == 20 and data["steps"] == 4
    assert data["fid"] > 0 and data["fid_real_floor"] > 0 and 0 <= data["label_accuracy"] <= 1


def test_generate_on_tiny_sd_through_the_sd_code_path(run_cli, tmp_path: Path, tiny_sd_dir: Path) -> None:
    out = tmp_path / "sd.png"
    result = run_cli("generate", "--model", tiny_sd_dir, "--prompt", "the cat", "--num-images", "2", "--steps", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.mode == "RGB" and image.size[0] > 16


def test_eval_on_tiny_sd_says_metrics_are_unavailable(run_cli, tmp_path: Path, tiny_sd_dir: Path) -> None:
    out = tmp_path / "e.json"
    result = run_cli("eval", "--model", tiny_sd_dir, "--num-samples", "2", "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["fid"] is None and data["label_accuracy"] is None and "not available" in data["notes"]
    assert "not available" in result.stderr


def test_report_builds_a_markdown_table(run_cli, tmp_path: Path) -> None:
    (tmp_path / "fp.json").write_text(json.dumps({"model": "digits", "fid": 17.25, "label_accuracy": 0.99, "fid_real_floor": 6.2}))
    (tmp_path / "q.json").write_text(json.dumps({"method": "quest", "bits": "w4a8", "target": "tensorrt", "fid": 18.5, "label_accuracy": 0.98, "psnr_vs_fp": 30.1}))
    result = run_cli("report", tmp_path / "fp.json", tmp_path / "q.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("| method | bits | target | FID")
    assert "| fp | fp32 | - | 17.250 | 0.990 | - |" in lines
    assert "| quest | w4a8 | tensorrt | 18.500 | 0.980 | 30.100 |" in lines
    assert "fid_real_floor (held-out real digits vs reference): 6.200" in result.stdout
    bad = run_cli("report", tmp_path / "missing.json")
    assert bad.returncode == 2 and "cannot read eval JSON" in bad.stderr
