"""Reliability and safety (issue 7): bad input, damaged or foreign artifacts, concurrent writers,
interruption (SIGINT, SIGTERM, kill -9) and disk-full, each with its one-line message and exit code.

docs/errors.md tabulates these cases; every row names the test here (or elsewhere) that covers it.
Fast checks run the CLI's ``main()`` in this process (same code path, no interpreter start-up);
signals, kill -9, locks between processes, injected faults and a stubbed TensorRT run real
subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import CliResult, assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]


# -- runners ------------------------------------------------------------------------------------

def _record(args, result: CliResult) -> CliResult:
    """With QUEST_ERRORS_TABLE=FILE, append what a command printed (docs/errors.md is made from it)."""
    target = os.environ.get("QUEST_ERRORS_TABLE")
    if target:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        with open(target, "a") as handle:
            handle.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "args": [str(a) for a in args],
                                     "exit": result.returncode, "stderr": lines[-1] if lines else ""}) + "\n")
    return result


def _call_main(*args) -> CliResult:
    """``quest_export.cli.main()`` in this process: the exit code and output a user would see."""
    import contextlib
    import io

    from quest_export import cli

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    saved_state, saved_argv = cli._state, sys.argv
    cli._state = {"debug": False, "signal": None, "outputs": [], "locks": [], "resume_state": None}
    sys.argv = ["quest-export", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        cli._state, sys.argv = saved_state, saved_argv
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return _record(args, CliResult(code, out.getvalue(), err.getvalue()))


@pytest.fixture
def run_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run the CLI's ``main()`` in this process, from ``tmp_path``, logs under ``tmp_path/logs``."""

    def run(*args) -> CliResult:
        monkeypatch.setenv("QUEST_EXPORT_LOG_DIR", str(tmp_path / "logs"))
        monkeypatch.setenv("QUEST_THREADS", os.environ.get("QUEST_THREADS", "1"))
        monkeypatch.chdir(tmp_path)
        return _call_main(*args)

    return run


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "QUEST_THREADS": "1",
            "QUEST_EXPORT_LOG_DIR": str(tmp_path / "logs"), **extra}


def _popen(tmp_path: Path, *args, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "quest_export.cli", *map(str, args)], cwd=tmp_path, env=_env(tmp_path, **extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _last_line(stderr: str) -> str:
    return [line for line in stderr.strip().splitlines() if line.strip()][-1]


def _reseal(path: Path, edit) -> None:
    """Edit a JSON document and re-seal it: an artifact as another build would have written it."""
    from quest_export.artifacts import seal_document

    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(seal_document(doc), indent=2))


def _edit(path: Path, edit) -> None:
    """Edit a JSON document by hand (the seal is left as it was)."""
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=2))


# -- small artifacts shared by the module ---------------------------------------------------

@pytest.fixture(scope="module")
def art(tmp_path_factory, digits_calibration: Path) -> SimpleNamespace:
    """A ptq-timestep W8A8 digits checkpoint (2 timestep groups), its ONNX export and ORT engine."""
    from quest_export.engine.build import build_engine
    from quest_export.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("reliability")
    ckpt = root / "ckpt"
    result = _call_main("finetune", "--bits", "w8a8", "--method", "ptq-timestep", "--target", "onnxruntime", "--timestep-groups", "2",
                        "--calibration", digits_calibration, "--out", ckpt)
    assert result.returncode == 0, result.stderr
    export_checkpoint(ckpt, "onnxruntime", root / "onnx", verify=False, log=lambda _: None)
    build_engine(root / "onnx", "onnxruntime", root / "engine", log=lambda _: None)
    return SimpleNamespace(root=root, ckpt=ckpt, onnx=root / "onnx", engine=root / "engine", calibration=digits_calibration)


# -- bad flags and inputs ---------------------------------------------------------------------

@pytest.mark.parametrize(("bits", "message"), [("w4", "wXaY"), ("w9a8", "between 2 and 8"), ("int8", "wXaY")])
def test_ill_formed_bits(run_main, tmp_path: Path, bits: str, message: str) -> None:
    result = run_main("finetune", "--bits", bits, "--out", tmp_path / "q")
    assert_one_line_error(result, 2, message)
    assert not (tmp_path / "q").exists() and _hidden(tmp_path) == []


def test_guidance_must_be_finite(run_main, tmp_path: Path) -> None:
    result = run_main("generate", "--guidance", "inf", "--out", tmp_path / "g.png")
    assert_one_line_error(result, 2, "--guidance inf is not a finite number")
    assert not (tmp_path / "g.png").exists()


def test_empty_prompt_is_refused(run_main, tmp_path: Path) -> None:
    result = run_main("generate", "--prompt", "a cat", "--prompt", " ", "--out", tmp_path / "g.png")
    assert_one_line_error(result, 2, "--prompt number 2 is empty")


def test_report_refuses_a_json_that_is_not_an_eval_result(run_main, tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert_one_line_error(run_main("report", tmp_path / "bad.json"), 2, "is not an eval JSON object")


def test_offline_hub_id_that_is_not_a_local_folder(run_main, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_main("generate", "--model", "someorg/no-such-model", "--out", tmp_path / "g.png")
    assert_one_line_error(result, 2, "model 'someorg/no-such-model' is neither a local directory nor in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    assert "--model /path/to/dir" in result.stderr and not (tmp_path / "g.png").exists()


def test_existing_output_needs_force(run_main, tmp_path: Path) -> None:
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "keep.txt").write_text("mine")
    result = run_main("calibrate", "--trajectories", "2", "--steps", "2", "--out", tmp_path / "calib")
    assert_one_line_error(result, 2, "already exists; pass --force")
    assert (tmp_path / "calib" / "keep.txt").read_text() == "mine" and _hidden(tmp_path) == []


# -- damaged, edited or foreign artifacts -----------------------------------------------------

def test_corrupt_model_weights(run_main, tmp_path: Path) -> None:
    from quest_export.models.resolve import DIGITS_DIR

    model = tmp_path / "mydigits"
    shutil.copytree(DIGITS_DIR, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 100)
    result = run_main("generate", "--model", model, "--num-images", "1", "--steps", "1", "--out", tmp_path / "g.png")
    assert_one_line_error(result, 2, f"cannot load the digits model from {model}")
    assert "damaged or incomplete" in result.stderr and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage-unhashed"])
def test_corrupt_or_truncated_calibration_safetensors(run_main, tmp_path: Path, digits_calibration: Path, damage: str) -> None:
    calib = tmp_path / "calib"
    shutil.copytree(digits_calibration, calib)
    tensors = calib / "calibration.safetensors"
    if damage == "truncated":
        data = tensors.read_bytes()
        tensors.write_bytes(data[: len(data) // 3])
        expected = "does not match the hash in calibration.json"
    else:  # a set written before hashes were recorded, then overwritten with garbage
        _edit(calib / "calibration.json", lambda d: (d.pop("tensors_sha256"), d.pop("document_sha256")))
        tensors.write_bytes(b"{not a safetensors header" * 10)
        expected = "the file is damaged, re-record it"
    result = run_main("finetune", "--method", "ptq", "--calibration", calib, "--out", tmp_path / "q")
    assert_one_line_error(result, 2, expected)
    assert not (tmp_path / "q").exists()


def test_nan_in_calibration_data_is_refused_naming_the_tensor(run_main, tmp_path: Path, digits_calibration: Path) -> None:
    import torch

    from quest.calibration import CalibrationSet
    from quest_export.calibration_data import save_calibration

    meta = json.loads((digits_calibration / "calibration.json").read_text())
    calib = CalibrationSet.load(digits_calibration / "calibration.safetensors", meta)
    calib.x[5, 0, 3, 3] = float("nan")
    (tmp_path / "nan").mkdir()
    save_calibration(tmp_path / "nan", calib)  # hashes are valid: the data itself is bad
    result = run_main("finetune", "--method", "ptq", "--calibration", tmp_path / "nan", "--out", tmp_path / "q")
    assert_one_line_error(result, 2, "calibration tensor 'x' contains NaN or Inf (in 1 of 80 rows)")
    assert not (tmp_path / "q").exists()
    assert torch.isnan(calib.x).any()


def test_truncated_onnx_is_refused(run_main, art, tmp_path: Path) -> None:
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(art.onnx, onnx_dir)
    data = (onnx_dir / "model.onnx").read_bytes()
    (onnx_dir / "model.onnx").write_bytes(data[: len(data) // 2])
    result = run_main("build-engine", onnx_dir, "--out", tmp_path / "engine")
    assert_one_line_error(result, 2, "does not match its hash in manifest.json; re-export it")
    assert not (tmp_path / "engine").exists() and _hidden(tmp_path) == []


@pytest.mark.parametrize("artifact", ["engine", "export", "checkpoint"])
def test_edited_manifest_is_refused(run_main, art, tmp_path: Path, artifact: str) -> None:
    if artifact == "engine":
        directory = tmp_path / "engine"
        shutil.copytree(art.engine, directory)
        _edit(directory / "manifest.json", lambda d: d["profile"]["batch"].update(max=5000))
        args = ["generate", "--engine", directory, "--num-images", "2", "--steps", "1", "--out", tmp_path / "g.png"]
        expected = "manifest.json was edited after it was written (content hash mismatch); rebuild the engine"
    elif artifact == "export":
        directory = tmp_path / "onnx"
        shutil.copytree(art.onnx, directory)
        _edit(directory / "manifest.json", lambda d: d["graphs"]["model"].update(sha256="0" * 64))
        args = ["build-engine", directory, "--out", tmp_path / "e"]
        expected = "manifest.json was edited after it was written (content hash mismatch); re-export"
    else:
        directory = tmp_path / "ckpt"
        shutil.copytree(art.ckpt, directory)
        _edit(directory / "quant.json", lambda d: d.update(method="quest"))
        args = ["export", directory, "--no-verify", "--out", tmp_path / "e"]
        expected = "quant.json was edited after it was written (content hash mismatch)"
    result = run_main(*args)
    assert_one_line_error(result, 2, expected)
    assert not (tmp_path / "e").exists() and not (tmp_path / "g.png").exists()


def test_checkpoint_and_calibration_of_another_model(run_main, tmp_path: Path, digits_calibration: Path) -> None:
    from safetensors.torch import load_file, save_file

    from quest_export.models.resolve import DIGITS_DIR

    model = tmp_path / "mydigits"
    shutil.copytree(DIGITS_DIR, model)
    result = run_main("finetune", "--model", model, "--method", "ptq", "--bits", "w8a8", "--calibration", digits_calibration, "--out", tmp_path / "q")
    assert result.returncode == 0, result.stderr
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("conv_in.weight"))
    state[name] = state[name] * 1.01
    save_file(state, str(weights))  # the model folder now holds another model
    result = run_main("export", tmp_path / "q", "--no-verify", "--out", tmp_path / "onnx")
    assert_one_line_error(result, 2, "was made from a different")
    assert "content hash mismatch" in result.stderr and not (tmp_path / "onnx").exists()
    result = run_main("finetune", "--model", model, "--method", "ptq", "--calibration", digits_calibration, "--out", tmp_path / "q2")
    assert_one_line_error(result, 2, "was recorded from model 'digits'")


def test_engine_of_another_backend(run_main, art, tmp_path: Path) -> None:
    engine = tmp_path / "trt-engine"
    shutil.copytree(art.engine, engine)
    _reseal(engine / "manifest.json", lambda d: d.update(backend="tensorrt"))  # as a TensorRT build would say
    result = run_main("bench", "--engine", engine, "--iterations", "1", "--warmup", "0")
    assert_one_line_error(result, 2, "bench times CPU engines (onnxruntime, openvino); ")
    assert "is a tensorrt engine: build one with `build-engine --backend onnxruntime`" in result.stderr
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        result = run_main("generate", "--engine", engine, "--num-images", "2", "--steps", "1", "--out", tmp_path / "g.png")
        assert_one_line_error(result, 2, "TensorRT is not installed")
        assert "use --backend onnxruntime" in result.stderr and not (tmp_path / "g.png").exists()


def test_out_of_profile_shapes_are_refused_before_sampling(run_main, art, tmp_path: Path) -> None:
    engine = tmp_path / "small-engine"
    shutil.copytree(art.engine, engine)
    _reseal(engine / "manifest.json", lambda d: d["profile"].update(name="small", latent={"min": 8, "opt": 8, "max": 12}))
    result = run_main("generate", "--engine", engine, "--num-images", "2", "--steps", "1", "--out", tmp_path / "g.png")
    assert_one_line_error(result, 2, "the model samples 16x16 latents, outside the engine's build profile 'small' (latent 8-12)")
    started = time.perf_counter()
    result = run_main("eval", "--engine", art.engine, "--num-samples", "300", "--batch-size", "300", "--steps", "1")
    assert_one_line_error(result, 2, "runs the engine on batches of 600, outside its build profile 'digits' (batch 1-500)")
    assert time.perf_counter() - started < 60  # refused before any sampling
    profile = tmp_path / "small.yaml"
    profile.write_text("name: small\nbatch: {min: 1, opt: 2, max: 8}\nlatent: {min: 32, opt: 64, max: 64}\ntokens: {min: 4, opt: 4, max: 4}\n")
    result = run_main("build-engine", art.onnx, "--profile", profile, "--out", tmp_path / "e")
    assert_one_line_error(result, 2, "build profile 'small' covers latents 32-64")
    assert not (tmp_path / "e").exists()


def test_engine_inputs_with_nan_are_refused_naming_the_tensor(art) -> None:
    import torch

    from quest_export.errors import UserError
    from quest_export.runtime.engine_unet import EngineUNet

    unet = EngineUNet.from_engine(art.engine)
    sample = torch.zeros(2, 1, 16, 16)
    sample[1, 0, 4, 4] = float("nan")
    with pytest.raises(UserError, match="sample contains NaN or Inf"):
        unet(sample, 10, torch.zeros(2, 4, 32))


def test_no_gpu_for_the_tensorrt_backend(art, tmp_path: Path) -> None:
    stub = tmp_path / "stub" / "tensorrt"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('__version__ = "0.0-stub"\n')  # TensorRT "installed", but no GPU visible
    proc = subprocess.run([sys.executable, "-m", "quest_export.cli", "build-engine", str(art.onnx), "--backend", "tensorrt", "--out", str(tmp_path / "trt")],
                          cwd=tmp_path, capture_output=True, text=True,
                          env=_env(tmp_path, PYTHONPATH=str(tmp_path / "stub"), CUDA_VISIBLE_DEVICES=""))
    assert_one_line_error(_record(proc.args[3:], CliResult(proc.returncode, proc.stdout, proc.stderr)), 2, "the tensorrt backend needs an NVIDIA GPU and none is visible")
    assert not (tmp_path / "trt").exists()


# -- concurrent writers ------------------------------------------------------------------------

def test_second_writer_is_refused_and_sigterm_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "calib"
    first = _popen(tmp_path, "calibrate", "--trajectories", "64", "--steps", "50", "--out", out)
    lock = tmp_path / ".calib.lock"
    _wait_for(lambda: lock.is_file() and f'"pid": {first.pid}' in lock.read_text(), first)
    second = subprocess.run([sys.executable, "-m", "quest_export.cli", "calibrate", "--trajectories", "2", "--steps", "2", "--out", str(out)],
                            cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True)
    assert_one_line_error(_record(second.args[3:], CliResult(second.returncode, second.stdout, second.stderr)), 2,
                          f"{out} is being written by another quest-export process (pid {first.pid}); wait for it or remove the stale lock {lock}")
    time.sleep(1.0)
    _sigterm_leaves_nothing(first, out, tmp_path)


_SWALLOWED_SIGNAL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import typer
from quest_export import cli_process
from quest_export.artifacts import atomic_directory

app = typer.Typer()

class SignalInFinaliser:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10000):  # the handler runs here, inside __del__, where Python drops its raise
            pass

@app.command()
def write(out: Path) -> None:
    cli_process.lock_output(out)
    with atomic_directory(out) as tmp:
        (tmp / "part").write_text("half")
        SignalInFinaliser()
        print("the raise was swallowed")

cli_process.run_app(app)
"""


def test_a_signal_whose_raise_a_finaliser_swallows_still_commits_nothing(tmp_path: Path) -> None:
    """Python drops an exception raised inside ``__del__`` (seen on a CI run: SIGTERM landed in a
    regex finaliser and calibrate wrote its output with exit 0). The signal is recorded, so the
    artifact commit refuses and the command exits 130 with the usual line."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _SWALLOWED_SIGNAL_SCRIPT, str(out)], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert "the raise was swallowed" in proc.stdout  # the situation is reproduced, not avoided
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: interrupted by SIGTERM; partial output removed, {out} was not written"]
    assert not out.exists() and _hidden(tmp_path) == []


def test_stale_lock_and_temporaries_of_a_dead_writer_are_taken_over(run_main, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".calib.lock").write_text(json.dumps({"pid": dead.pid, "host": "x"}))
    (tmp_path / ".calib.abc123_z.tmp").mkdir()  # what a killed writer leaves
    (tmp_path / ".calib.abc123_z.tmp" / "calibration.safetensors").write_bytes(b"half")
    (tmp_path / ".calibrate-other.lock").write_text("{}")  # another output's lock: not ours to touch
    result = run_main("calibrate", "--trajectories", "2", "--steps", "2", "--out", tmp_path / "calib")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "calib" / "calibration.safetensors").is_file()
    assert _hidden(tmp_path) == [".calibrate-other.lock"]


def test_lock_module_refuses_a_live_holder_and_reports_its_pid(tmp_path: Path) -> None:
    from quest_export.errors import UserError
    from quest_export.locking import OutputLock

    with OutputLock(tmp_path / "out") as held:
        assert json.loads(held.path.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=rf"pid {os.getpid()}\); wait for it or remove the stale lock"):
            OutputLock(tmp_path / "out").acquire()
    assert _hidden(tmp_path) == []
    with OutputLock(tmp_path / "out"):  # free again
        pass


def test_cleanup_restores_a_replaced_artifact_killed_between_its_two_renames(tmp_path: Path) -> None:
    from quest_export.artifacts import remove_stale_temporaries, write_json_atomic

    old = tmp_path / ".ckpt.k1l2m3n4.old"
    (old / "x").mkdir(parents=True)
    (old / "x" / "quant.json").write_text("previous")
    (tmp_path / ".ckpt.a1b2c3d4.tmp").mkdir()  # the new one, complete or not: unknown
    (tmp_path / ".ckpt2.a1b2c3d4.tmp").mkdir()  # another output's temporary: left alone
    remove_stale_temporaries(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "quant.json").read_text() == "previous"
    assert _hidden(tmp_path) == [".ckpt2.a1b2c3d4.tmp"]
    write_json_atomic(tmp_path / "r.json", {"a": 1})  # artifacts get the usual mode, not mkstemp's 0600
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~mask


# -- interruption -----------------------------------------------------------------------------

def _quick_quest_recipe(path: Path, steps: int) -> Path:
    import yaml

    from quest.recipe import recipes_dir

    data = yaml.safe_load((recipes_dir() / "digits-w8a8.yaml").read_text())
    data["activation_init"] = "minmax"
    data["timestep_groups"] = 2
    data["finetune"]["checkpoint_every"] = 2
    data["finetune"]["stages"] = [{"name": "temporal", "steps": steps, "batch_size": 2}, {"name": "critical", "steps": steps, "batch_size": 2}]
    path.write_text(yaml.safe_dump(data))
    return path


def test_sigint_mid_finetune_then_resume(run_main, tmp_path: Path, digits_calibration: Path) -> None:
    recipe = _quick_quest_recipe(tmp_path / "r.yaml", steps=4)
    out = tmp_path / "q"
    args = ["finetune", "--bits", "w8a8", "--method", "quest", "--recipe", recipe, "--calibration", digits_calibration, "--out", out]
    proc = _popen(tmp_path, *args)
    state = tmp_path / ".q.finetune-state.safetensors"
    _wait_for(state.is_file, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    _record(proc.args[3:], CliResult(proc.returncode, "", stderr))
    assert proc.returncode == 130, stderr
    assert _last_line(stderr) == (f"error: interrupted by SIGINT; partial output removed, {out} was not written; "
                                  f"the finetuning state is kept in {state}: rerun the same command with --resume")
    assert "Traceback" not in stderr and not out.exists() and _hidden(tmp_path) == [state.name]
    other = _quick_quest_recipe(tmp_path / "other.yaml", steps=5)
    mismatch = run_main(*[other if a == recipe else a for a in args], "--resume")
    assert_one_line_error(mismatch, 2, f"finetuning state {state} belongs to a run with other settings or data")
    assert state.is_file() and not out.exists()  # the refused resume kept the state
    resumed = run_main(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    log = json.loads((out / "finetune_log.json").read_text())
    assert [r["step"] for r in log if "step" in r] == list(range(4)) * 2  # every step exactly once
    assert _hidden(tmp_path) == []  # the state file is gone after success


def _sigterm_leaves_nothing(proc: subprocess.Popen, out: Path, tmp_path: Path) -> None:
    """SIGTERM a running command: exit 130, one line, no output and no hidden temporaries."""
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    _record(proc.args[3:], CliResult(proc.returncode, "", stderr))
    assert proc.returncode == 130, stderr
    assert _last_line(stderr) == f"error: interrupted by SIGTERM; partial output removed, {out} was not written"
    assert not out.exists() and _hidden(tmp_path) == []


def _temp_dir_of(out: Path):
    return lambda: any(p.name.startswith(f".{out.name}.") and p.name.endswith(".tmp") for p in out.parent.iterdir())


@pytest.mark.slow  # SIGTERM's cleanup is also shown, faster, on calibrate (test_second_writer_is_refused_and_sigterm_leaves_nothing)
def test_sigterm_mid_export_leaves_nothing(art, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    proc = _popen(tmp_path, "export", art.ckpt, "--no-verify", "--out", out)
    _wait_for(_temp_dir_of(out), proc)
    _sigterm_leaves_nothing(proc, out, tmp_path)


def test_kill_9_mid_export_then_the_next_run_cleans_up(run_main, art, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    proc = _popen(tmp_path, "export", art.ckpt, "--no-verify", "--out", out)
    _wait_for(_temp_dir_of(out), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # no visible half-written artifact
    leftovers = _hidden(tmp_path)
    assert ".onnx.lock" in leftovers and any(name.endswith(".tmp") for name in leftovers)  # hidden, unavoidable after kill -9
    result = run_main("export", art.ckpt, "--no-verify", "--out", out)
    assert result.returncode == 0, result.stderr
    assert (out / "model.onnx").is_file() and _hidden(tmp_path) == []  # stale lock taken over, temporaries removed


# -- runtime failures ---------------------------------------------------------------------------

def test_disk_full_during_write(run_main, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from quest.calibration import CalibrationSet

    def full(self, path):  # the writer gets half-way, then the disk is full
        Path(path).write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(CalibrationSet, "save", full)
    out = tmp_path / "calib"
    result = run_main("calibrate", "--trajectories", "2", "--steps", "2", "--out", out)
    assert_one_line_error(result, 1, f"no space left on device while writing {out}; free space or choose another --out (partial output removed; traceback in ")
    assert not out.exists() and _hidden(tmp_path) == []
    logs = list((tmp_path / "logs").glob("*-calibrate-*.log"))
    assert len(logs) == 1 and "No space left on device" in logs[0].read_text()


def test_runtime_failure_is_one_line_with_a_log_and_debug_raises(run_main, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import quest_export.calibration_data

    def broken(*args, **kwargs):
        raise RuntimeError("simulated backend failure")

    monkeypatch.setattr(quest_export.calibration_data, "record_for_model", broken)
    result = run_main("calibrate", "--trajectories", "2", "--steps", "2", "--out", tmp_path / "calib")
    assert_one_line_error(result, 1, "error: RuntimeError: simulated backend failure (traceback in ")
    assert "rerun with --debug to print it" in result.stderr
    log = Path(result.stderr.split("traceback in ", 1)[1].split(";", 1)[0])
    assert log.parent == tmp_path / "logs" and "Traceback" in log.read_text() and "simulated backend failure" in log.read_text()
    with pytest.raises(RuntimeError, match="simulated backend failure"):  # --debug: the exception (and its traceback) propagate
        run_main("--debug", "calibrate", "--trajectories", "2", "--steps", "2", "--out", tmp_path / "calib")
    assert not (tmp_path / "calib").exists() and _hidden(tmp_path) == []
