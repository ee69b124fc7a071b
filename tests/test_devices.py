"""Issue 15: --device and --teacher-dtype through the commands, device-independent checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error
from quest_export.devices import resolve_device, resolve_teacher_dtype
from quest_export.errors import UserError
from test_finetune_cli import _small_recipe

HAS_CUDA = torch.cuda.is_available()
# every device this host has: a checkpoint made on each must load on each (CPU-only hosts: cpu)
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def test_device_names_resolve() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(UserError, match="unknown --device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(UserError, match="unknown --device"):
        resolve_device("cuda:x")
    assert resolve_teacher_dtype(None) is torch.float32 and resolve_teacher_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(UserError, match="--teacher-dtype"):
        resolve_teacher_dtype("int8")


@pytest.mark.skipif(HAS_CUDA, reason="this host has a CUDA GPU")
def test_cuda_without_a_gpu_is_one_clear_line(run_cli, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda:1")
    for command in (["finetune", "--out", tmp_path / "ckpt"], ["calibrate", "--out", tmp_path / "calib"],
                    ["eval", "--num-samples", "2"], ["generate", "--out", tmp_path / "g.png"],
                    ["sensitivity", "--out", tmp_path / "sens"]):
        result = run_cli(*command, "--device", "cuda")
        assert_one_line_error(result, 2, "--device cuda: PyTorch sees no CUDA GPU")
    assert not any(p.name in ("ckpt", "calib", "sens", "g.png") for p in tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_a_gpu_index_past_the_last_is_refused() -> None:
    with pytest.raises(UserError, match="CUDA GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.slow  # ~30 s (CI budget); --device resolution and refusals are tested by default in this file
def test_explicit_cpu_through_finetune_and_eval(run_cli, tmp_path: Path, digits_calibration: Path) -> None:
    recipe = _small_recipe(tmp_path / "r.yaml", "digits-w4a8.yaml", steps=2)
    ckpt = tmp_path / "quest"
    result = run_cli("finetune", "--bits", "w4a8", "--method", "quest", "--recipe", recipe, "--calibration", digits_calibration,
                     "--device", "cpu", "--out", ckpt)
    assert result.returncode == 0, result.stderr
    meta = json.loads((ckpt / "quant.json").read_text())
    assert meta["device"] == "cpu"
    result = run_cli("eval", "--checkpoint", ckpt, "--device", "cpu", "--num-samples", "10", "--steps", "4", "--json", tmp_path / "e.json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert metrics["psnr_vs_fp"] > 10 and metrics["method"] == "quest"


def test_teacher_dtype_only_with_quest(run_cli, tmp_path: Path) -> None:
    result = run_cli("finetune", "--method", "ptq", "--teacher-dtype", "float16", "--out", tmp_path / "c")
    assert_one_line_error(result, 2, "--teacher-dtype applies only to --method quest")
    result = run_cli("finetune", "--teacher-dtype", "float8", "--out", tmp_path / "c")
    assert_one_line_error(result, 2, "unknown --teacher-dtype 'float8'")


def test_low_precision_teacher_is_cast_back_to_float32() -> None:
    from quest.teacher import fp_copy, run_teacher
    from quest_export.models.resolve import load_model

    unet = load_model("digits").pipeline.unet
    x, t, states = torch.randn(2, 1, 32, 32), torch.tensor([10, 900]), None
    states = torch.randn(2, 1, unet.config.cross_attention_dim)
    reference = run_teacher(fp_copy(unet), x, t, states)
    for dtype in (torch.bfloat16, torch.float16):
        teacher = fp_copy(unet, dtype)
        assert next(teacher.parameters()).dtype == dtype and next(unet.parameters()).dtype == torch.float32
        out = run_teacher(teacher, x, t, states)
        assert out.dtype == torch.float32
        assert (out - reference).abs().max() < 0.05 * reference.abs().max()  # close to FP32, not equal


@pytest.mark.parametrize("made_on", DEVICES)
@pytest.mark.parametrize("loaded_on", DEVICES)
def test_checkpoint_made_on_one_device_loads_on_another(tmp_path: Path, digits_calibration: Path, made_on: str, loaded_on: str) -> None:
    """The checkpoint files hold CPU tensors and no device: what was finetuned on a GPU exports on a
    CPU-only machine. On a host with a GPU this runs every pair (cuda -> cpu included)."""
    from quest.recipe import load_recipe
    from quest_export.calibration_data import load_calibration
    from quest_export.finetune_job import write_checkpoint
    from quest_export.models.resolve import load_model
    from quest_export.quantization import checkpoint_meta, load_quantized, quantize_with_method

    model = load_model("digits", made_on)
    calib = load_calibration(digits_calibration, model).to(made_on)
    recipe = load_recipe("digits", "w8a8", None)
    qunet, report = quantize_with_method(model, recipe, "ptq", calib)
    write_checkpoint(tmp_path / "ckpt", qunet, checkpoint_meta(model, "ptq", calib, {"timings": report}))
    x, t, states = calib.unet_inputs(torch.arange(4))
    expected = qunet.unet(x, t, encoder_hidden_states=states).sample.cpu()

    _, loaded, _ = load_quantized(tmp_path / "ckpt", loaded_on)
    assert {p.device.type for p in loaded.unet.parameters()} == {torch.device(loaded_on).type}
    got = loaded.unet(x.to(loaded_on), t.to(loaded_on), encoder_hidden_states=states.to(loaded_on)).sample.cpu()
    tolerance = 0 if made_on == loaded_on else 1e-3  # CPU and GPU kernels round differently
    assert (got - expected).abs().max() <= tolerance
