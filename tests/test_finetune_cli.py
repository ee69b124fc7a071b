"""`calibrate`, `finetune --method ptq|ptq-timestep|modelopt` and `eval --checkpoint` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_one_line_error


@pytest.fixture(scope="module")
def digits_calibration(tmp_path_factory) -> Path:
    """A small calibration set of the shipped digits model (8 trajectories x 10 steps)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("calib") / "digits"
    proc = subprocess.run(
        [sys.executable, "-m", "quest_export.cli", "calibrate", "--model", "digits", "--trajectories", "8", "--steps", "10", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_calibration_set_records_trajectories(digits_calibration: Path) -> None:
    from quest.calibration import CalibrationSet

    meta = json.loads((digits_calibration / "calibration.json").read_text())
    assert meta["rows"] == 80 and len(meta["timesteps"]) == 10 and meta["guidance"] == 2.0
    calib = CalibrationSet.load(digits_calibration / "calibration.safetensors")
    assert calib.x.shape == (80, 1, 16, 16) and calib.uncond is not None and calib.cond.shape == calib.uncond.shape
    assert sorted(set(calib.t.tolist()), reverse=True) == meta["timesteps"]


@pytest.mark.parametrize(
    ("method", "bits", "target"),
    [("ptq", "w8a8", "onnxruntime"), ("ptq-timestep", "w4a8", "tensorrt"), ("modelopt", "w8a8", "tensorrt")],
)
def test_finetune_methods_write_checkpoints_that_eval_reads(run_cli, tmp_path: Path, digits_calibration: Path, method: str, bits: str, target: str) -> None:
    ckpt = tmp_path / "ckpt"
    result = run_cli(
        "finetune", "--model", "digits", "--bits", bits, "--method", method, "--target", target,
        "--calibration", digits_calibration, "--out", ckpt,
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads((ckpt / "quant.json").read_text())
    assert meta["method"] == method and meta["bits"] == bits and meta["target"] == target
    assert meta["timestep_grid"]["num_groups"] == (1 if method in ("ptq", "modelopt") else 10)
    assert meta["model"]["name"] == "digits" and meta["model"]["content_hash"]
    out = tmp_path / "eval.json"
    result = run_cli("eval", "--checkpoint", ckpt, "--num-samples", "10", "--steps", "5", "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["method"] == method and data["psnr_vs_fp"] > 10 and data["fid"] > 0 and 0 <= data["label_accuracy"] <= 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_finetune_and_eval_on_tiny_sd(run_cli, tmp_path: Path, tiny_sd_dir: Path) -> None:
    calib = tmp_path / "calib"
    result = run_cli("calibrate", "--model", tiny_sd_dir, "--trajectories", "2", "--steps", "3", "--out", calib)
    assert result.returncode == 0, result.stderr
    for method, target in (("ptq", "onnxruntime"), ("ptq-timestep", "tensorrt"), ("modelopt", "tensorrt")):
        ckpt = tmp_path / method
        result = run_cli("finetune", "--model", tiny_sd_dir, "--bits", "w4a8", "--method", method, "--target", target, "--calibration", calib, "--out", ckpt)
        assert result.returncode == 0, (method, result.stderr)
    out = tmp_path / "eval.json"
    result = run_cli("eval", "--checkpoint", tmp_path / "ptq-timestep", "--num-samples", "2", "--steps", "2", "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["fid"] is None and data["psnr_vs_fp"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "w9a8"], "between 2 and 8"),
        (["--bits", "4"], "wXaY"),
        (["--method", "magic"], "unknown --method"),
        (["--target", "coreml"], "unknown target"),
        (["--method", "modelopt", "--target", "onnxruntime"], "use --target tensorrt"),
    ],
)
def test_finetune_bad_flags(run_cli, tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("finetune", "--model", "digits", *args, "--out", tmp_path / "ckpt")
    assert_one_line_error(result, 2, message)
    assert not (tmp_path / "ckpt").exists()


def test_recipe_naming_no_layer(run_cli, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("layers:\n  - {pattern: 'no_such_block.*', act_bits: 8}\n")
    result = run_cli("finetune", "--bits", "w4a8", "--recipe", recipe, "--out", tmp_path / "ckpt")
    assert_one_line_error(result, 2, "match no layer")


def test_recipe_the_target_cannot_express(run_cli, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: tensorrt\nactivation_symmetric: false\n")
    result = run_cli("finetune", "--bits", "w8a8", "--recipe", recipe, "--out", tmp_path / "ckpt")
    assert_one_line_error(result, 2, "symmetric")


def test_finetune_refuses_existing_out(run_cli, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    result = run_cli("finetune", "--bits", "w8a8", "--out", tmp_path / "ckpt")
    assert_one_line_error(result, 2, "--force")


def test_eval_of_damaged_checkpoint(run_cli, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "quant.json").write_text("{}")
    (tmp_path / "ckpt" / "quant.safetensors").write_bytes(b"garbage")
    result = run_cli("eval", "--checkpoint", tmp_path / "ckpt", "--num-samples", "2")
    assert_one_line_error(result, 2, "quant.json")
