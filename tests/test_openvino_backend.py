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


@pytest.fixture(scope="module")
def ov_engine(tmp_path_factory, digits_calibration: Path) -> Path:
    """digits W4A8 ptq-timestep (2 groups) for the openvino target -> export -> OpenVINO engine."""
    import subprocess

    from quest_export.engine.build import VerifyOptions, build_engine
    from quest_export.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("openvino")

    def run_cli(*args):
        return subprocess.run([sys.executable, "-m", "quest_export.cli", *map(str, args)], capture_output=True, text=True)

    ckpt = _finetune(run_cli, root / "ckpt", digits_calibration, "w4a8", "openvino", "--timestep-groups", "2")
    export_checkpoint(ckpt, "openvino", root / "onnx", calibration=digits_calibration, log=lambda _: None)
    out = root / "engine"
    build_engine(root / "onnx", "openvino", out, verify=VerifyOptions(calibration=digits_calibration), log=lambda _: None)
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


def test_openvino_engine_drops_into_the_digits_pipeline(ov_engine: Path) -> None:
    import torch

    from quest_export.quantization import load_quantized
    from quest_export.runtime.load import load_engine_model

    loaded = load_engine_model(ov_engine)
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


def test_bench_times_the_openvino_engine_against_every_float_engine(run_cli, ov_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--engine", ov_engine, "--iterations", "2", "--warmup", "1", "--threads", "1", "--profile",
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
    ir = [ov_engine / "model.xml", ov_engine / "model.bin"]
    assert doc["engine_bytes"] == sum(p.stat().st_size for p in ir)  # what ships: graph and weights
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
