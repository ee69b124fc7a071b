"""Issue 15: graphs past protobuf's 2 GB limit (an FP32 SD1.5 UNet is 3.4 GB) export with external
data, pass parity, build into an ONNX Runtime engine and run in a pipeline.

The graph is made large cheaply: the tiny SD UNet with a 23,168-wide time embedding, whose
23,168 x 23,168 ``time_embedding.linear_2`` (2.147 GB in FP32) the recipe leaves unquantized, so the
quantized graph itself carries it. The width is the largest whose one weight still fits a single
protobuf message (onnx-graphsurgeon's export copies each initializer as a message and fails with
EncodeError on one past 2 GiB; real UNets have none, SD1.5's largest weight is 59 MB), so the graph
passes the limit only with everything else.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from tiny_sd import TINY_TEXT, TINY_UNET, TINY_VAE

WIDE = 23_168  # 537M weights in one layer: 2^31 - 0.4 MB in FP32; the graph around it passes 2^31


@pytest.fixture(scope="module")
def wide_sd(tmp_path_factory) -> Path:
    from quest_export.models.sd_shaped import build_sd_pipeline

    return build_sd_pipeline(tmp_path_factory.mktemp("wide") / "wide-sd", {**TINY_UNET, "time_embedding_dim": WIDE}, TINY_TEXT, TINY_VAE)


def _two_gather_graph(elements: int) -> onnx.ModelProto:
    """y = W1[idx] + W2[idx]: two FP32 tables of ``elements`` each, so the graph is large while no
    single tensor passes protobuf's per-message limit (as in a real UNet)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    tables = [numpy_helper.from_array(np.full(elements, float(k + 1), dtype=np.float32), f"w{k}") for k in range(2)]
    nodes = [helper.make_node("Gather", [f"w{k}", "idx"], [f"g{k}"]) for k in range(2)]
    nodes.append(helper.make_node("Add", ["g0", "g1"], ["y"]))
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])], tables)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.slow  # 90 s of 2 GB disk I/O on 2 cores (CI budget); the SD1.5-size runs (scripts/sd15_scale.sh) go through it too
def test_graph_io_past_2gb_saves_external_data_and_opens(tmp_path: Path) -> None:
    """The default run's proof of the > 2 GB path (the full CLI chain on a wide UNet is ``slow``):
    save, size, shape inference and ONNX Runtime sessions, in memory and from disk."""
    import numpy as np
    import onnxruntime as ort

    from quest_export.onnx_io import (EXTERNAL_DATA_LIMIT, data_file, graph_bytes, infer_shapes, inference_session,
                                      is_large, save_graph, serialized_bytes)

    model = _two_gather_graph(280_000_000)  # 2 x 1.12 GB
    assert serialized_bytes(model) > EXTERNAL_DATA_LIMIT and is_large(model)
    inferred = infer_shapes(model)
    assert [v.name for v in inferred.graph.value_info] == ["g0", "g1"]

    path = tmp_path / "model.onnx"
    save_graph(model, path)
    assert data_file(path).stat().st_size > EXTERNAL_DATA_LIMIT and path.stat().st_size < 1 << 20
    assert graph_bytes(path) == path.stat().st_size + data_file(path).stat().st_size
    assert len(model.graph.initializer[0].raw_data) == 4 * 280_000_000  # the caller's graph keeps its weights

    idx = np.array([0, 279_999_999], dtype=np.int64)
    options = ort.SessionOptions()
    for source in (path, model):  # from the saved files, and from memory through a temporary file
        session = inference_session(source, options, ["CPUExecutionProvider"])
        np.testing.assert_array_equal(session.run(None, {"idx": idx})[0], [3.0, 3.0])
        del session


@pytest.mark.slow  # 426 s and 19.5 GB peak RSS (AMD EPYC, 2 cores): the whole CLI chain on one 2 GB layer
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
