"""The OpenVINO backend (issue 18): an openvino-target export compiled by OpenVINO's CPU plugin,
verified against the simulation on this host, loaded by EngineUNet into the digits pipeline, timed
by bench against every float engine; and its bad inputs refused with one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import _finetune, assert_one_line_error

pytest.importorskip("openvino")


def _run_cli(*args):
    import subprocess

    return subprocess.run([sys.executable, "-m", "quest_export.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def ov_checkpoint(tmp_path_factory, digits_calibration: Path) -> Path:
    """digits W4A8 ptq-timestep (2 timestep groups) for the openvino target."""
    return _finetune(_run_cli, tmp_path_factory.mktemp("openvino") / "ckpt", digits_calibration, "w4a8", "openvino",
                     "--timestep-groups", "2")


@pytest.fixture(scope="module")
def ov_engine(ov_checkpoint: Path, digits_calibration: Path) -> Path:
    """The checkpoint -> export (scale tables) -> OpenVINO engine."""
    from quest_export.engine.build import VerifyOptions, build_engine
    from quest_export.export.exporter import export_checkpoint

    root = ov_checkpoint.parent
    export_checkpoint(ov_checkpoint, "openvino", root / "onnx", calibration=digits_calibration, log=lambda _: None)
    out = root / "engine"
    build_engine(root / "onnx", "openvino", out, verify=VerifyOptions(calibration=digits_calibration), log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def ov_group_engine(ov_checkpoint: Path, digits_calibration: Path) -> Path:
    """The same checkpoint built by the CLI into one OpenVINO engine per timestep group."""
    out = ov_checkpoint.parent / "group-engine"
    result = _run_cli("build-engine", ov_checkpoint, "--backend", "openvino", "--timestep-scales", "per-engine",
                      "--calibration", digits_calibration, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_openvino_engine_runs_every_conv_and_linear_in_integer_and_is_verified(ov_engine: Path) -> None:
    manifest = json.loads((ov_engine / "manifest.json").read_text())
    import openvino

    from quest_export.export.manifest import quantized_layer_count

    assert manifest["backend"] == "openvino" and manifest["target"] == "openvino"
    assert manifest["backend_version"] == openvino.__version__ and {"model.xml", "model.bin"} <= set(manifest["files"])
    assert manifest["inference_precision"] == "f32"
    precisions = manifest["kernel_precisions"]
    quantized = quantized_layer_count(manifest["layers"])
    assert manifest["integer_kernels"] == quantized > 0
    assert all(key.split()[-1] in ("u8", "i8") for key in precisions if key.split()[0] in ("Convolution", "FullyConnected"))
    result = manifest["verification"]["result"]
    assert result["passed"] and result["trajectory_psnr_db"] >= 40.0


@pytest.mark.parametrize("form", ["table", "per-engine"])
def test_openvino_engine_drops_into_the_digits_pipeline(form: str, request: pytest.FixtureRequest) -> None:
    import torch

    from quest_export.quantization import load_quantized
    from quest_export.runtime.load import load_engine_model

    loaded = load_engine_model(request.getfixturevalue("ov_engine" if form == "table" else "ov_group_engine"))
    assert loaded.pipeline.unet.device.type == "cpu"
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    images = loaded.pipeline([0, 1, 2, 3], num_inference_steps=6, guidance_scale=2.0, latents=noise, output_type="pt").images
    sim, _, _ = load_quantized(Path(loaded.pipeline.unet.manifest["source_checkpoint"]["path"]))
    reference = sim.pipeline([0, 1, 2, 3], num_inference_steps=6, guidance_scale=2.0, latents=noise, output_type="pt").images
    mse = float(((images - reference) ** 2).mean())
    assert images.shape == (4, 1, 16, 16) and 10 * np.log10(1.0 / max(mse, 1e-12)) > 30


def test_openvino_engine_refuses_damage_and_another_openvino_version(ov_engine: Path, tmp_path: Path) -> None:
    from quest_export.artifacts import seal_document
    from quest_export.errors import UserError
    from quest_export.runtime.engine_unet import EngineUNet

    damaged = tmp_path / "damaged"
    shutil.copytree(ov_engine, damaged)
    with open(damaged / "model.bin", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(UserError, match="does not match the hash"):
        EngineUNet.from_engine(damaged)
    other = tmp_path / "other-version"
    shutil.copytree(ov_engine, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["backend_version"] = "2025.1.0-00000"
    manifest.pop("document_sha256", None)
    (other / "manifest.json").write_text(json.dumps(seal_document(manifest)))
    with pytest.raises(UserError, match="built and verified with OpenVINO 2025.1.0-00000.*rebuild it"):
        EngineUNet.from_engine(other)


def _runtime_layers(xml: Path) -> "collections.Counter[str]":
    import collections

    import openvino

    compiled = openvino.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return collections.Counter(op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops())


def test_per_group_openvino_engines_have_constant_scales_and_are_verified(ov_group_engine: Path, ov_engine: Path) -> None:
    from quest_export.export.manifest import quantized_layer_count

    manifest = json.loads((ov_group_engine / "manifest.json").read_text())
    groups = manifest["engine_groups"]
    assert list(groups) == ["group0", "group1"] and manifest["source_export"]["timestep_scales"] == "per-engine"
    assert {f"group{g}/model.{ext}" for g in (0, 1) for ext in ("xml", "bin")} <= set(manifest["files"])
    quantized = quantized_layer_count(manifest["layers"])
    assert all(entry["integer_kernels"] == quantized > 0 for entry in groups.values())
    result = manifest["verification"]["result"]
    assert result["passed"] and result["trajectory_psnr_db"] >= 40.0
    # the point of per-group engines: no per-timestep scale gathers and rescaling around the kernels
    table, group = _runtime_layers(ov_engine / "model.xml"), _runtime_layers(ov_group_engine / "group0" / "model.xml")
    assert group["Gather"] * 10 < table["Gather"] and sum(group.values()) < 0.7 * sum(table.values())


def test_per_group_engine_runs_every_row_on_its_groups_engine(ov_group_engine: Path) -> None:
    import torch

    from quest_export.errors import UserError
    from quest_export.runtime.engine_unet import EngineUNet

    unet = EngineUNet.from_engine(ov_group_engine, verify="never")
    start = json.loads((ov_group_engine / "manifest.json").read_text())["timestep_grid"]["group_starts"][1]
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(4, 1, 16, 16, generator=generator)
    cond = torch.randn(4, 4, unet.config["cross_attention_dim"], generator=generator)  # the digits profile: 4 tokens
    timestep = torch.tensor([float(start + 10), 5.0, float(start - 1), 999.0])
    mixed = unet(sample, timestep, cond).sample
    for i in range(4):  # one row at a time: one engine per call
        alone = unet(sample[i : i + 1], timestep[i : i + 1], cond[i : i + 1]).sample
        assert torch.allclose(mixed[i : i + 1], alone, atol=1e-5), i
    group0, group1 = (r.run(sample, torch.full((4,), t), cond) for r, t in zip(unet.runner.runners, (5.0, float(start))))
    assert not torch.allclose(group0, group1)  # the two engines hold different scales
    from quest_export import api

    saved = api.Engine(ov_group_engine, unet.manifest).save(ov_group_engine.parent / "saved-group-engine", force=True)
    assert torch.allclose(EngineUNet.from_engine(saved, verify="never")(sample, timestep, cond).sample, mixed, atol=1e-6)
    damaged = ov_group_engine.parent / "damaged-group-engine"
    shutil.copytree(ov_group_engine, damaged)
    with open(damaged / "group1" / "model.bin", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(UserError, match="group1/model.bin does not match the hash"):
        EngineUNet.from_engine(damaged)


def test_bench_times_the_openvino_engine_against_every_float_engine(run_cli, ov_group_engine: Path, tmp_path: Path) -> None:
    """On the per-group engine: bench's rows are one timestep, so one group engine is timed and profiled."""
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--engine", ov_group_engine, "--iterations", "2", "--warmup", "1", "--threads", "1", "--profile",
                     "--baselines", "openvino-fp32", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "OpenVINO profiler" in result.stderr and "speedup ceiling" in result.stderr
    doc = json.loads(out.read_text())
    # OpenVINO's own counters: integer convolutions in the engine, float ones in OpenVINO FP32
    assert doc["profile"]["profiler"] == "OpenVINO"
    assert any(op.startswith("Convolution") and op.endswith(("i8", "u8")) for op in doc["profile"]["quantized"])
    assert "Convolution f32" in doc["profile"]["fp32"] and doc["ceiling"]["integer_kernel_ms"] > 0
    assert doc["backend"] == "openvino" and doc["fp32_engine"] == "openvino-fp32"
    assert set(doc["baselines"]) == {"onnxruntime-fp32", "openvino-fp32"}  # the ones asked for
    fastest = min(doc["baselines"][n]["latency_ms"] for n in ("onnxruntime-fp32", "openvino-fp32"))
    assert doc["speedup_vs_best_fp32"] == pytest.approx(fastest / doc["latency_ms"])
    assert doc["speedup"] == pytest.approx(doc["baselines"]["openvino-fp32"]["latency_ms"] / doc["latency_ms"])
    assert doc["integer_kernels"]["integer_kernels"] > 0
    # resident memory each engine added (both group engines are open), the runtimes' libraries not counted
    assert doc["engine_resident_bytes"] > 0 and all("resident_bytes" in b for b in doc["baselines"].values())
    assert doc["group_engines"] == 2 and doc["integer_kernels"]["per_group_integer_kernels"] == [doc["integer_kernels"]["integer_kernels"]] * 2
    ir = [ov_group_engine / f"group{g}" / f"model.{ext}" for g in (0, 1) for ext in ("xml", "bin")]
    assert doc["engine_bytes"] == sum(p.stat().st_size for p in ir)  # what ships: both groups' graph and weights
    assert ir[1].stat().st_size < 0.5 * doc["fp32_onnx_bytes"]  # the IR's weights keep the int8 codes


def test_openvino_backend_refuses_other_targets_exports_and_a_missing_openvino(run_cli, exported: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    result = run_cli("build-engine", exported["onnxruntime"], "--backend", "openvino", "--out", tmp_path / "e")
    assert_one_line_error(result, contains="--target openvino")
    assert not (tmp_path / "e").exists()
    # a Python without OpenVINO: an import shim that fails like a missing package
    shim = tmp_path / "no-openvino"
    (shim / "openvino").mkdir(parents=True)
    (shim / "openvino" / "__init__.py").write_text("raise ImportError('No module named openvino')\n")
    result = run_cli("build-engine", exported["onnxruntime"], "--backend", "openvino", "--out", tmp_path / "e",
                     env={"PYTHONPATH": f"{shim}"})
    assert_one_line_error(result, contains="OpenVINO is not installed")
