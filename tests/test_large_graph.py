"""Issue 15: graphs past protobuf's 2 GB limit (an FP32 SD1.5 UNet is 3.4 GB) export with external
data, pass parity, build into an ONNX Runtime engine and run in a pipeline.

The graph is made large cheaply: the tiny SD UNet with a 23,200-wide time embedding, whose
23,200 x 23,200 ``time_embedding.linear_2`` (2.15 GB in FP32) the recipe leaves unquantized, so the
quantized graph itself carries it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_sd import TINY_TEXT, TINY_UNET, TINY_VAE

WIDE = 23_200  # 538M weights in one layer: 2.15 GB in FP32, past the 2 GiB limit


@pytest.fixture(scope="module")
def wide_sd(tmp_path_factory) -> Path:
    from quest_export.models.sd_shaped import build_sd_pipeline

    return build_sd_pipeline(tmp_path_factory.mktemp("wide") / "wide-sd", {**TINY_UNET, "time_embedding_dim": WIDE}, TINY_TEXT, TINY_VAE)


def test_graph_past_2gb_exports_with_external_data_and_builds(run_cli, wide_sd: Path, tmp_path: Path) -> None:
    from quest_export.onnx_io import EXTERNAL_DATA_LIMIT, graph_bytes

    calib, ckpt, onnx_dir, engine = (tmp_path / n for n in ("calib", "ckpt", "onnx", "engine"))
    result = run_cli("calibrate", "--model", wide_sd, "--trajectories", "1", "--steps", "2", "--out", calib)
    assert result.returncode == 0, result.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: onnxruntime\ntimestep_groups: 1\nlayers:\n  - {pattern: time_embedding.linear_2, quantize: false}\n")
    result = run_cli("finetune", "--model", wide_sd, "--bits", "w8a8", "--method", "ptq", "--recipe", recipe,
                     "--calibration", calib, "--out", ckpt)
    assert result.returncode == 0, result.stderr

    result = run_cli("export", ckpt, "--target", "onnxruntime", "--calibration", calib, "--out", onnx_dir)
    assert result.returncode == 0, result.stderr
    assert "parity PASSED" in result.stdout
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    graph = manifest["graphs"]["model"]
    data = onnx_dir / graph["data"]["file"]
    assert data.name == "model.onnx.data" and data.stat().st_size == graph["data"]["bytes"] > EXTERNAL_DATA_LIMIT
    assert (onnx_dir / "model.onnx").stat().st_size < 64 << 20  # the structure alone; the weights are apart
    assert manifest["parity_passed"]

    profile = tmp_path / "tiny-sd.yaml"
    profile.write_text("name: tiny-sd\nbatch: {min: 1, opt: 2, max: 2}\nlatent: {min: 8, opt: 8, max: 8}\n"
                       "tokens: {min: 16, opt: 16, max: 16}\noptimization_level: 3\nworkspace_mib: 256\n"
                       "timing_cache: null\nort: {intra_op_threads: 0, memory_arena: true}\n")
    result = run_cli("build-engine", onnx_dir, "--backend", "onnxruntime", "--profile", profile, "--calibration", calib,
                     "--verify-samples", "1", "--out", engine)
    assert result.returncode == 0, result.stderr
    engine_manifest = json.loads((engine / "manifest.json").read_text())
    assert "model.ort.onnx.data" in engine_manifest["files"]  # hashed like every engine file
    assert graph_bytes(engine / "model.ort.onnx") > EXTERNAL_DATA_LIMIT

    result = run_cli("generate", "--engine", engine, "--prompt", "a red fox", "--num-images", "1", "--steps", "2",
                     "--out", tmp_path / "g.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "g.png").stat().st_size > 0

    (onnx_dir / "model.onnx.data").write_bytes(b"damaged")  # a graph whose weights were lost is refused
    result = run_cli("build-engine", onnx_dir, "--backend", "onnxruntime", "--profile", profile, "--out", tmp_path / "e2")
    assert result.returncode == 2 and "external weights" in result.stderr, result.stderr
