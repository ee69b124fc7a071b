"""`calibrate`, `finetune --method ptq|ptq-timestep|modelopt` and `eval --checkpoint` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_one_line_error


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


@pytest.mark.slow  # ~35 s (CI budget); the tiny SD finetune runs by default in test_quest_finetune_with_the_sd15_recipe_on_the_tiny_sd_fixture
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


def _small_recipe(path: Path, base: str, steps: int = 6, **calibration) -> Path:
    """A shipped recipe with short finetuning stages (and optionally a small calibration)."""
    import yaml

    from quest.recipe import recipes_dir

    data = yaml.safe_load((recipes_dir() / base).read_text())
    data["finetune"]["checkpoint_every"] = 2
    data["finetune"]["stages"] = [{"name": "temporal", "steps": steps, "batch_size": 4}, {"name": "critical", "steps": steps, "batch_size": 4}]
    data["timestep_groups"] = 2
    data["calibration"].update(calibration)
    path.write_text(yaml.safe_dump(data))
    return path


def test_quest_finetune_writes_checkpoint_and_stage_log(run_cli, tmp_path: Path, digits_calibration: Path) -> None:
    recipe = _small_recipe(tmp_path / "r.yaml", "digits-w4a8.yaml")
    ckpt = tmp_path / "quest"
    result = run_cli("finetune", "--bits", "w4a8", "--method", "quest", "--recipe", recipe, "--calibration", digits_calibration, "--out", ckpt)
    assert result.returncode == 0, result.stderr
    meta = json.loads((ckpt / "quant.json").read_text())
    assert meta["method"] == "quest" and meta["timings"]["stages"] == ["temporal", "critical"]
    log = json.loads((ckpt / "finetune_log.json").read_text())
    assert [r["step"] for r in log if r.get("stage") == "temporal" and "step" in r] == list(range(6))
    assert not list(tmp_path.glob(".quest.finetune-state*"))  # state removed after success
    result = run_cli("eval", "--checkpoint", ckpt, "--num-samples", "10", "--steps", "4", "--json", tmp_path / "e.json")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # 30-75 s on 2 cores (CI budget); resume itself runs by default (test_sigint_mid_finetune_then_resume, test_interrupted_run_resumes_to_the_same_result)
def test_kill_9_mid_finetune_then_resume_gives_the_same_checkpoint(run_cli, tmp_path: Path, digits_calibration: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = _small_recipe(tmp_path / "r.yaml", "digits-w4a8.yaml", steps=8)
    common = ["finetune", "--bits", "w4a8", "--method", "quest", "--recipe", str(recipe), "--calibration", str(digits_calibration)]
    assert run_cli(*common, "--out", tmp_path / "straight").returncode == 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "quest_export.cli", *common, "--out", str(tmp_path / "resumed")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / ".resumed.finetune-state.safetensors"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert state.exists(), "no finetuning checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "resumed").exists()  # nothing half-written
    result = run_cli(*common, "--out", tmp_path / "resumed", "--resume")
    assert result.returncode == 0, result.stderr
    straight = json.loads((tmp_path / "straight" / "quant.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "quant.json").read_text())
    assert resumed["tensors_sha256"] == straight["tensors_sha256"]


def test_quest_finetune_with_the_sd15_recipe_on_the_tiny_sd_fixture(run_cli, tmp_path: Path, tiny_sd_dir: Path) -> None:
    import yaml

    from quest.recipe import recipes_dir

    data = yaml.safe_load((recipes_dir() / "sd15-w4a8.yaml").read_text())
    assert len(data["calibration"]["prompts"]) >= 8
    data["calibration"].update({"trajectories": 2, "steps": 3})
    data["finetune"]["stages"] = [{"name": "temporal", "steps": 2, "batch_size": 2}, {"name": "critical", "steps": 2, "batch_size": 2}]
    recipe = tmp_path / "sd.yaml"
    recipe.write_text(yaml.safe_dump(data))
    ckpt = tmp_path / "ckpt"
    result = run_cli("finetune", "--model", tiny_sd_dir, "--bits", "w4a8", "--method", "quest", "--recipe", recipe, "--out", ckpt)
    assert result.returncode == 0, result.stderr
    meta = json.loads((ckpt / "quant.json").read_text())
    assert meta["method"] == "quest" and meta["recipe"]["name"] == "sd" and meta["calibration"]["rows"] == 6
    assert (ckpt / "calibration.safetensors").is_file()


def test_sensitivity_command(run_cli, tmp_path: Path, digits_calibration: Path) -> None:
    out = tmp_path / "sens"
    result = run_cli("sensitivity", "--bits", "w4a4", "--calibration", digits_calibration, "--max-rows", "20", "--out", out)
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "sensitivity.json").read_text())
    groups = [r["group"] for r in data["ranking"]]
    assert "time_emb_proj" in groups and "feed_forward" in groups
    assert [r["mse"] for r in data["ranking"]] == sorted((r["mse"] for r in data["ranking"]), reverse=True)
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
