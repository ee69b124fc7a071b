"""Shared fixtures: the tiny SD-shaped pipeline and a CLI runner that goes through `main()`."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_sd import build_tiny_sd  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD pipeline saved with save_pretrained (same classes as sd15)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture
def run_cli(tmp_path: Path):
    """Run the real console entry point in a subprocess (exit codes and stderr as a user sees them)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> CliResult:
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
                    "QUEST_EXPORT_LOG_DIR": str(tmp_path / "logs"), **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-m", "quest_export.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            cwd=tmp_path,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


def assert_one_line_error(result: CliResult, code: int = 2, contains: str = "") -> None:
    """A user error: non-zero exit, no traceback, one `error:` line naming the problem."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert contains in lines[0], lines[0]


@pytest.fixture(scope="session")
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


# -- shared quantized artifacts (digits, ptq-timestep: quick) -----------------------------------

def _finetune(run_cli, out: Path, calibration: Path, bits: str, target: str, *extra: str) -> Path:
    result = run_cli("finetune", "--model", "digits", "--bits", bits, "--method", "ptq-timestep", "--target", target,
                     "--calibration", calibration, "--out", out, *extra)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, digits_calibration: Path) -> dict[str, Path]:
    """ptq-timestep digits checkpoints: W4A4 onnxruntime (10 groups) and W4A8 tensorrt (2 groups)."""
    root = tmp_path_factory.mktemp("export-ckpt")

    def run_cli(*args):
        return subprocess.run([sys.executable, "-m", "quest_export.cli", *map(str, args)], capture_output=True, text=True)

    return {
        # mixed precision off: its measurement (minutes on 2 cores) is tested on tiny SD in test_options_w4a4_methods
        "onnxruntime": _finetune(run_cli, root / "ort-w4a4", digits_calibration, "w4a4", "onnxruntime", "--act8-layers", "0"),
        "tensorrt": _finetune(run_cli, root / "trt-w4a8", digits_calibration, "w4a8", "tensorrt", "--timestep-groups", "2"),
    }


@pytest.fixture(scope="session")
def exported(tmp_path_factory, checkpoints: dict[str, Path], digits_calibration: Path) -> dict[str, Path]:
    from quest_export.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("exported")
    out = {}
    for target, ckpt in checkpoints.items():
        out[target] = root / target
        export_checkpoint(ckpt, target, out[target], calibration=digits_calibration, log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def ort_engine(tmp_path_factory, exported: dict[str, Path], digits_calibration: Path) -> Path:
    """The W4A4 onnxruntime export built into an ONNX Runtime engine (verified on this host)."""
    from quest_export.engine.build import VerifyOptions, build_engine

    out = tmp_path_factory.mktemp("engines") / "digits-ort"
    manifest = build_engine(exported["onnxruntime"], "onnxruntime", out, verify=VerifyOptions(calibration=digits_calibration),
                            log=lambda _: None)
    assert manifest["backend"] == "onnxruntime" and "model.ort.onnx" in manifest["files"]
    return out
