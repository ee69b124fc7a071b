"""Engine-level verification: build-engine runs the engine it built against the simulation on this
host, refuses one that computes something else (naming the layer), records what the kernels depend
on, and a host of another kernel class re-verifies before the first call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from quest_export.artifacts import seal_document
from quest_export.engine import verify
from quest_export.engine.build import VerifyOptions, build_engine
from quest_export.engine.host import host_description, kernel_class
from quest_export.errors import UserError
from quest_export.runtime.engine_unet import EngineUNet

LAYER = "down_blocks.1.resnets.0.conv1"


def test_the_manifest_records_host_runtime_and_the_verification(ort_engine: Path) -> None:
    import onnxruntime

    manifest = json.loads((ort_engine / "manifest.json").read_text())
    section = manifest["verification"]
    here = host_description()
    assert section["host"]["kernel_flags"] == here["kernel_flags"] and section["host"]["model"] == here["model"]
    assert section["fingerprint"]["backend_version"] == onnxruntime.__version__
    assert section["fingerprint"]["device"] == {"kind": "cpu", "machine": here["machine"], "kernel_flags": here["kernel_flags"]}
    assert section["fingerprint"]["provider"] == "CPUExecutionProvider"
    result = section["result"]
    assert result["passed"] and result["per_call_rel_error"] <= result["bounds"]["per_call_rel_error"]
    assert result["trajectory_psnr_db"] >= result["bounds"]["trajectory_psnr_db"]
    # W4A4: the bound follows the verified reference graph's own distance (4-bit ties), capped at 40 dB
    assert result["bounds"]["trajectory_psnr_db"] == pytest.approx(min(40.0, result["reference_graph"]["trajectory_psnr_db"] - 3.0))
    assert len(section["call_timesteps"]) >= 10 and section["trajectory_samples"] == 8 and section["steps"] == 10
    assert "verification.safetensors" in manifest["files"]


@pytest.mark.parametrize("factor", [2.0, 1.05])
def test_build_engine_refuses_an_engine_that_computes_something_else(exported: dict[str, Path], digits_calibration: Path,
                                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      factor: float) -> None:
    """One weight scale changed in the optimized model, before verification: refused, layer named, nothing written.
    At 1.05 the free-running figures may stay inside their bounds; the kernel check still refuses it."""
    from quest_export.engine import onnxruntime_backend

    optimize = onnxruntime_backend.optimize

    def tampered(*args, **kwargs):
        model, fusions = optimize(*args, **kwargs)
        conv = next(n for n in model.graph.node if n.op_type == "QLinearConv" and f"{LAYER}.weight" in n.input[3])
        scale = next(i for i in model.graph.initializer if i.name == conv.input[4])
        scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * factor, scale.name))
        return model, fusions

    monkeypatch.setattr(onnxruntime_backend, "optimize", tampered)
    out = tmp_path / "engine"
    with pytest.raises(UserError, match=rf"engine verification failed on this host .*worst layer: {LAYER} \(QLinearConv"):
        build_engine(exported["onnxruntime"], "onnxruntime", out, verify=VerifyOptions(calibration=digits_calibration),
                     log=lambda _: None)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.slow  # 10 group engines: about 100 s on 2 cores (the per-group build path runs by default in test_openvino_backend)
def test_per_group_engines_are_each_kernel_checked_on_their_own_groups_rows(checkpoints: dict[str, Path], digits_calibration: Path,
                                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint built into one ONNX Runtime engine per timestep group (``--timestep-scales
    per-engine``): one weight scale changed by 5% in the last group's engine only is refused, the
    layer and its group engine named, nothing written; the other groups' engines pass."""
    from quest_export.engine import onnxruntime_backend

    optimize, built = onnxruntime_backend.optimize, []

    def tampered(*args, **kwargs):
        model, fusions = optimize(*args, **kwargs)
        built.append(args[0])
        if len(built) == 10:  # the W4A4 checkpoint has 10 timestep groups: the last one's engine
            conv = next(n for n in model.graph.node if n.op_type == "QLinearConv" and f"{LAYER}.weight" in n.input[3])
            scale = next(i for i in model.graph.initializer if i.name == conv.input[4])
            scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 1.05, scale.name))
        return model, fusions

    monkeypatch.setattr(onnxruntime_backend, "optimize", tampered)
    out = tmp_path / "engine"
    with pytest.raises(UserError, match=rf"engine verification failed on this host .*worst layer: {LAYER} \(group9 engine\) \(QLinearConv"):
        build_engine(checkpoints["onnxruntime"], "onnxruntime", out, timestep_scales="per-engine",
                     verify=VerifyOptions(calibration=digits_calibration), log=lambda _: None)
    assert [Path(p).name for p in built] == [f"model.group{g}.onnx" for g in range(10)]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def _with_manifest(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest.pop("document_sha256", None)
    path.write_text(json.dumps(seal_document(manifest)))
    return dst


def _elsewhere(manifest: dict) -> None:
    """As if verified on an AVX2-only host with another runtime version."""
    manifest["verification"]["fingerprint"]["device"]["kernel_flags"] = ["avx2", "sse4_1"]
    manifest["verification"]["host"] = {**manifest["verification"]["host"], "model": "AMD EPYC (test)", "kernel_class": "avx2"}


def test_another_kernel_class_reverifies_before_the_first_call(ort_engine: Path, tmp_path: Path) -> None:
    same = EngineUNet.from_engine(ort_engine)
    assert same.verification is not None and "seconds" in same.verification  # the build's own result, not re-run
    moved = _with_manifest(ort_engine, tmp_path / "moved", _elsewhere)
    engine = EngineUNet.from_engine(moved)
    built = json.loads((ort_engine / "manifest.json").read_text())["verification"]["result"]
    assert engine.verification["passed"]
    assert engine.verification["per_call_rel_error"] == pytest.approx(built["per_call_rel_error"], rel=1e-3)


def test_a_host_where_the_kernels_compute_otherwise_is_refused(ort_engine: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from quest_export.engine.onnxruntime_backend import OrtRunner

    moved = _with_manifest(ort_engine, tmp_path / "moved", _elsewhere)
    call = OrtRunner.__call__

    def saturating(self, sample, timestep, states):  # what a kernel that computes other codes looks like from outside
        out = call(self, sample, timestep, states)
        return out + 0.2 * np.sign(out) * np.abs(out).mean()

    monkeypatch.setattr(OrtRunner, "__call__", saturating)
    with pytest.raises(UserError, match=r"was verified on AMD EPYC \(test\) \(avx2\) but computes something else on this host"):
        EngineUNet.from_engine(moved)
    EngineUNet.from_engine(ort_engine)  # on the host it was verified on, nothing is re-run
    with pytest.raises(UserError, match="computes something else"):
        EngineUNet.from_engine(ort_engine, verify="always")


def test_engine_unet_refuses_timesteps_outside_the_training_range(ort_engine: Path) -> None:
    engine = EngineUNet.from_engine(ort_engine)
    x, states = torch.zeros(2, 1, 16, 16), torch.zeros(2, 4, 32)
    for bad in (-1, 1000, float("nan")):
        with pytest.raises(UserError, match="outside the model's training range"):
            engine(x, bad, states)
    assert engine(x, 999.0, states).sample.shape == (2, 1, 16, 16)


def test_bounds_follow_the_reference_graph() -> None:
    assert verify.bounds_for({"per_call_rel_error": 0.015, "trajectory_psnr_db": 44.0}) == {
        "per_call_rel_error": 0.03, "trajectory_psnr_db": 40.0}
    low = verify.bounds_for({"per_call_rel_error": 0.0, "trajectory_psnr_db": 32.0})
    assert low == {"per_call_rel_error": verify.PER_CALL_FLOOR, "trajectory_psnr_db": 29.0}


def test_kernel_class_names_the_integer_kernel_family() -> None:
    assert kernel_class({"avx2", "avx512bw", "avx512_vnni", "amx_int8"}) == "amx"
    assert kernel_class({"avx2", "avx512bw", "avx512_vnni"}) == "avx512-vnni"
    assert kernel_class({"avx2", "avx_vnni"}) == "avx-vnni"
    assert kernel_class({"avx2", "avx512bw"}) == "avx512"
    assert kernel_class({"avx2"}) == "avx2"


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_a_checkpoint_of_an_older_profile_revision_is_refused(checkpoints: dict[str, Path], tmp_path: Path, target: str) -> None:
    """Revision 1 of onnxruntime simulated 8-bit weights the engine no longer builds; revision 1 of
    tensorrt quantized with FP32 scales where the FP16 graph holds FP16 ones."""
    from quest_export.quantization import load_quantized

    ckpt = tmp_path / "old"
    shutil.copytree(checkpoints[target], ckpt)
    meta = json.loads((ckpt / "quant.json").read_text())
    assert meta["target_revision"] == 2
    meta.pop("target_revision")  # as written before revisions existed
    meta.pop("document_sha256", None)
    (ckpt / "quant.json").write_text(json.dumps(seal_document(meta)))
    with pytest.raises(UserError, match=f"revision 1 of the {target} target.*re-run quest-export finetune"):
        load_quantized(ckpt)


def test_build_engine_without_the_source_checkpoint_or_unverified(run_cli, exported: dict[str, Path], tmp_path: Path) -> None:
    from conftest import assert_one_line_error

    export = tmp_path / "onnx"
    shutil.copytree(exported["onnxruntime"], export)
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["source_checkpoint"]["path"] = str(tmp_path / "gone")
    manifest.pop("document_sha256", None)
    (export / "manifest.json").write_text(json.dumps(seal_document(manifest)))
    assert_one_line_error(run_cli("build-engine", export, "--out", tmp_path / "e"), 2, "needs the export's source checkpoint")
    assert not (tmp_path / "e").exists()
    result = run_cli("build-engine", export, "--out", tmp_path / "e", "--no-verify")
    assert result.returncode == 0 and "NOT verified" in result.stderr, result.stderr
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["verification"] is None
    assert_one_line_error(run_cli("verify-engine", tmp_path / "e"), 2, "built with --no-verify")
    with pytest.warns(UserWarning, match="without engine verification"):
        EngineUNet.from_engine(tmp_path / "e")
