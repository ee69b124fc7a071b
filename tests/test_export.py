"""`quest-export export`: Q/DQ graphs for both targets, parity with the simulation, lint, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import assert_one_line_error


def test_onnxruntime_export_matches_simulation_and_runs_integer_kernels(exported: dict[str, Path]) -> None:
    directory = exported["onnxruntime"]
    parity = json.loads((directory / "parity.json").read_text())
    assert parity["passed"] and parity["min_code_agreement"] >= 0.999 and parity["max_abs_error"] < 1e-3
    kinds = {t["kind"] for t in parity["tensors"]}
    assert kinds == {"weight", "activation", "output"}
    assert all(t["code_agreement"] >= 0.999 for t in parity["tensors"])
    groups = parity["graphs"]["model"]["timesteps"]
    assert len(groups) >= 10  # rows from every timestep group
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["target"] == "onnxruntime" and manifest["opset"] == 21 and manifest["timestep_grid"]["num_groups"] == 10
    assert manifest["graphs"]["model"]["sha256"] and manifest["source_checkpoint"]["tensors_sha256"]
    assert manifest["quantized_onnx_bytes"] < 0.5 * manifest["fp32_onnx_bytes"]
    kernels = manifest["ort_integer_kernels"]
    assert kernels["integer_share"] >= 0.9 and kernels["by_op"].get("QLinearConv", 0) > 0
    layer = manifest["layers"]["conv_in"]
    assert layer["weight"]["storage"] == "int8" and layer["input"]["storage"] == "uint8" and layer["output"]["bits"] == 8

    model = onnx.load(str(directory / "model.onnx"))
    weights = [i for i in model.graph.initializer if i.name.startswith("quest_codes/")]
    assert weights and all(i.data_type == onnx.TensorProto.INT8 for i in weights)
    assert any(i.name == "quest_timestep_lookup" for i in model.graph.initializer)
    assert [p.name for p in directory.parent.iterdir() if p.name.startswith(".")] == []
    # per-timestep tables as run-time per-sample Q scales (no rescaling Muls), 4-bit grids clipped on the codes
    nodes = list(model.graph.node)
    assert not any(n.name.endswith("/Rescale") for n in nodes)
    table_q = [n for n in nodes if n.op_type == "QuantizeLinear" and n.input[1].endswith(".timestep_scale")]
    assert table_q and all(any(a.name == "axis" and a.i == 0 for a in n.attribute) for n in table_q)
    assert any(n.name.endswith("/ClipCodes") for n in nodes)
    assert any(n.op_type == "DequantizeLinear" and n.input[1].endswith(".output_scale") for n in nodes)


def test_tensorrt_export_is_fp16_passes_lint_and_strict_fp32_parity(exported: dict[str, Path]) -> None:
    from quest_export.export.lint import lint_tensorrt

    directory = exported["tensorrt"]
    model = onnx.load(str(directory / "model.onnx"))
    assert lint_tensorrt(model) == []
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input}["sample"] == onnx.TensorProto.FLOAT
    zero_points = [i for i in model.graph.initializer if i.name.endswith(".zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)
    parity = json.loads((directory / "parity.json").read_text())
    strict = parity["graphs"]["model"]["fp32_qdq_graph"]
    assert strict["passed"] and strict["min_code_agreement"] >= 0.999 and strict["max_abs_error"] < 1e-3
    assert parity["passed"] and parity["graph_precision"] == "fp16" and parity["min_code_agreement"] >= 0.97


def test_per_engine_timestep_scales_write_one_graph_per_group(checkpoints: dict[str, Path], digits_calibration: Path, tmp_path: Path) -> None:
    from quest_export.export.exporter import export_checkpoint

    result = export_checkpoint(checkpoints["tensorrt"], "tensorrt", tmp_path / "per", timestep_scales="per-engine",
                               calibration=digits_calibration, log=lambda _: None)
    assert sorted(result.manifest["graphs"]) == ["group0", "group1"]
    assert result.parity["passed"]
    model = onnx.load(str(tmp_path / "per" / "model.group0.onnx"))
    assert not any(i.name.endswith("timestep_factor_table") for i in model.graph.initializer)


def test_export_refuses_a_target_the_checkpoint_was_not_made_for(run_cli, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    result = run_cli("export", checkpoints["tensorrt"], "--target", "onnxruntime", "--out", tmp_path / "x")
    assert_one_line_error(result, 2, "made for target 'tensorrt'")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("damage", ["truncate-tensors", "edit-model-hash", "drop-meta"])
def test_export_refuses_damaged_or_foreign_checkpoints(run_cli, checkpoints: dict[str, Path], tmp_path: Path, damage: str) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["onnxruntime"], ckpt)
    if damage == "truncate-tensors":
        data = (ckpt / "quant.safetensors").read_bytes()
        (ckpt / "quant.safetensors").write_bytes(data[: len(data) // 2])
        expected = "damaged"
    elif damage == "edit-model-hash":
        meta = json.loads((ckpt / "quant.json").read_text())
        meta["model"]["content_hash"] = "0" * 64
        (ckpt / "quant.json").write_text(json.dumps(meta))
        expected = "different 'digits' model"
    else:
        (ckpt / "quant.json").unlink()
        expected = "not a quantized checkpoint"
    result = run_cli("export", ckpt, "--target", "onnxruntime", "--out", tmp_path / "x")
    assert_one_line_error(result, 2, expected)
    assert not (tmp_path / "x").exists()


def test_export_refuses_unwritable_or_existing_output(run_cli, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(run_cli("export", checkpoints["onnxruntime"], "--out", blocker / "sub"), 2, "")
    existing = tmp_path / "existing"
    existing.mkdir()
    assert_one_line_error(run_cli("export", checkpoints["onnxruntime"], "--out", existing), 2, "--force")


def test_tiny_sd_checkpoint_exports_and_verifies(run_cli, tiny_sd_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    result = run_cli("finetune", "--model", tiny_sd_dir, "--bits", "w8a8", "--method", "ptq-timestep",
                     "--target", "onnxruntime", "--out", ckpt)
    assert result.returncode == 0, result.stderr
    result = run_cli("export", ckpt, "--target", "onnxruntime", "--out", tmp_path / "onnx")
    assert result.returncode == 0, result.stderr
    assert "parity PASSED" in result.stdout
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["parity_passed"] and manifest["export_seconds"] > 0 and manifest["fp32_onnx_bytes"] > manifest["quantized_onnx_bytes"]
    _engine_unet_drops_into_stable_diffusion(tmp_path / "onnx", ckpt, tmp_path)


def _engine_unet_drops_into_stable_diffusion(export_dir: Path, ckpt: Path, tmp_path: Path) -> None:
    """EngineUNet as ``pipe.unet`` of a real StableDiffusionPipeline: DDIM and DPM-Solver++ at step
    counts other than the calibration's, classifier-free guidance (batch doubled), vs the simulation."""
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from quest_export.engine.build import build_engine
    from quest_export.quantization import load_quantized
    from quest_export.runtime.engine_unet import EngineUNet

    profile = tmp_path / "tiny-sd.yaml"
    profile.write_text("name: tiny-sd\nbatch: {min: 1, opt: 4, max: 8}\nlatent: {min: 8, opt: 8, max: 8}\n"
                       "tokens: {min: 16, opt: 16, max: 16}\noptimization_level: 3\nworkspace_mib: 256\n"
                       "timing_cache: null\nort: {intra_op_threads: 1, memory_arena: true}\n")
    build_engine(export_dir, "onnxruntime", tmp_path / "engine", profile=profile, log=lambda _: None)
    sim, _, _ = load_quantized(ckpt)
    pipe = sim.pipeline
    simulated_unet = pipe.unet
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for scheduler_cls, steps in ((DDIMScheduler, 6), (DPMSolverMultistepScheduler, 5)):
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        args = dict(prompt=["a red cube", "the sea"], num_inference_steps=steps, guidance_scale=3.0,
                    latents=latents.clone(), output_type="latent")
        pipe.unet = simulated_unet
        reference = pipe(**args).images
        pipe.unet = EngineUNet.from_engine(tmp_path / "engine")
        got = pipe(**args).images
        assert got.shape == reference.shape == (2, 4, 8, 8) and torch.isfinite(got).all()
        relative = float((got - reference).norm() / reference.norm())
        assert relative < 0.05, (scheduler_cls.__name__, relative)


# -- engines and the runtime ------------------------------------------------------------------

def test_engine_unet_drops_into_the_digits_pipeline_with_euler(ort_engine: Path) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler

    from quest_export.quantization import load_quantized
    from quest_export.runtime.load import load_engine_model

    loaded = load_engine_model(ort_engine)
    pipe = loaded.pipeline
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    images = pipe([0, 1, 2, 3], num_inference_steps=7, guidance_scale=2.0, latents=noise, output_type="pt").images
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    # against the simulation of the same checkpoint, same scheduler and noise
    sim, _, _ = load_quantized(Path(loaded.pipeline.unet.manifest["source_checkpoint"]["path"]))
    sim.pipeline.scheduler = EulerDiscreteScheduler.from_config(sim.pipeline.scheduler.config)
    reference = sim.pipeline([0, 1, 2, 3], num_inference_steps=7, guidance_scale=2.0, latents=noise, output_type="pt").images
    mse = float(((images - reference) ** 2).mean())
    assert 10 * np.log10(1.0 / max(mse, 1e-12)) > 25


def test_engine_loading_refuses_damage_and_foreign_backends(ort_engine: Path, tmp_path: Path) -> None:
    import torch

    from quest_export.errors import UserError
    from quest_export.runtime.engine_unet import EngineUNet

    with pytest.raises(UserError, match="built for backend 'onnxruntime'"):
        EngineUNet.from_engine(ort_engine, backend="tensorrt")
    damaged = tmp_path / "damaged"
    shutil.copytree(ort_engine, damaged)
    with open(damaged / "model.ort.onnx", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(UserError, match="does not match the hash"):
        EngineUNet.from_engine(damaged)
    (damaged / "model.ort.onnx").unlink()
    with pytest.raises(UserError, match="is missing"):
        EngineUNet.from_engine(damaged)
    unet = EngineUNet.from_engine(ort_engine)
    with pytest.raises(UserError, match="outside the engine's build profile"):
        unet(torch.zeros(2, 1, 32, 32), 10, torch.zeros(2, 4, 32))


def test_bench_times_the_engine_against_its_fp32_engine_and_bounds_the_speedup(run_cli, ort_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--engine", ort_engine, "--iterations", "2", "--warmup", "1", "--threads", "1", "--profile",
                     "--baselines", "onnxruntime-fp32", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "speedup ceiling" in result.stderr and "where the time goes" in result.stderr
    doc = json.loads(out.read_text())
    assert set(doc["baselines"]) == {"onnxruntime-fp32"} and doc["fp32_engine"] == "onnxruntime-fp32"
    kernels = doc["integer_kernels"]  # counted in the engine's stored graph
    assert 0 < kernels["integer_kernels"] <= kernels["quantized_linear_ops"] and kernels["by_op"].get("QLinearConv", 0) > 0
    assert doc["speedup"] == pytest.approx(doc["fp32_latency_ms"] / doc["latency_ms"])
    assert 0 < doc["size_ratio"] < 0.5  # 8-bit weights against FP32 ones
    assert doc["batch"] == 20 and doc["iterations"] == 2
    # the quantized engine runs integer kernels where the FP32 one runs Conv/MatMul
    assert "QLinearConv" in doc["profile"]["quantized"] and "Conv" in doc["profile"]["fp32"]
    assert "QLinearConv" not in doc["profile"]["fp32"]
    ceiling = doc["ceiling"]
    assert 0 < ceiling["shared_float_ms"] < ceiling["fp32_kernel_ms"] and ceiling["integer_kernel_ms"] > 0
    assert ceiling["ceiling_free_integer"] > ceiling["ceiling_measured_integer"] > 0


@pytest.mark.slow  # 60-130 s on 2 cores (CI budget); the same export -> engine -> bench path runs by default on digits
def test_bench_unet_is_exported_parity_checked_and_runs_every_linear_op_in_integer(run_cli, tmp_path: Path) -> None:
    """``bench --model bench-unet`` goes through the export's own graph pipeline (export_graphs):
    parity against the simulation, then both engines timed in one run."""
    out = tmp_path / "bench-unet.json"
    result = run_cli("bench", "--model", "bench-unet", "--bits", "w8a8", "--iterations", "1", "--warmup", "0", "--threads", "1",
                     "--baselines", "onnxruntime-fp32", "--json", out)
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["model"] == "bench-unet" and doc["method"] == "ptq"
    assert doc["parity_min_code_agreement"] >= 0.999
    kernels = doc["integer_kernels"]
    assert kernels["integer_kernels"] == kernels["quantized_linear_ops"] > 0
    assert doc["speedup"] == pytest.approx(doc["fp32_latency_ms"] / doc["latency_ms"])
    assert 0 < doc["size_ratio"] < 0.5


def test_tensorrt_backend_absent_is_one_clear_line(run_cli, exported: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    result = run_cli("build-engine", exported["tensorrt"], "--backend", "tensorrt", "--out", tmp_path / "trt")
    assert_one_line_error(result, 2, "TensorRT is not installed")
    assert not (tmp_path / "trt").exists()


def test_build_profile_shapes_and_validation() -> None:
    from quest_export.engine.profiles import BuildProfile, load_profile
    from quest_export.errors import UserError

    profile = load_profile("sd15-512")
    shapes = profile.shapes(4, 768)
    assert shapes["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (8, 4, 96, 96))
    assert shapes["encoder_hidden_states"][2] == (8, 77, 768)
    with pytest.raises(UserError, match="min <= opt <= max"):
        BuildProfile.from_dict({**profile.to_dict(), "batch": {"min": 4, "opt": 2, "max": 8}})
    with pytest.raises(UserError, match="not found"):
        load_profile("no-such-profile")
