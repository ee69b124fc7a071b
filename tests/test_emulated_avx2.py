"""The engine on the x86 class whose integer kernels saturate (AVX2 only, no VNNI), emulated.

ONNX Runtime picks its kernels from CPUID, so under QEMU user-mode emulation of a Haswell CPU it
runs the AVX2 U8S8 path (VPMADDUBSW) whatever the real host has; the integer results are those of
that CPU class. Slow (emulation), and needs qemu-user: `apt-get install qemu-user`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

QEMU = shutil.which("qemu-x86_64")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(QEMU is None, reason="qemu-user (qemu-x86_64) is not installed")]


def _emulated(*args: str, timeout: float = 3000) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_emulated_avx2_kernels_saturate_eight_bit_weights_as_the_numpy_model_says(tmp_path: Path) -> None:
    """The diagnosis itself: ORT's MatMulInteger on the AVX2 path equals the pair-saturating model,
    not the exact integer product, for 8-bit weights, and is exact for the profile's 7-bit ones."""
    script = tmp_path / "mm.py"
    script.write_text(
        "import numpy as np, onnxruntime as ort\n"
        "from onnx import helper as h, TensorProto as T, numpy_helper as nh\n"
        "rng = np.random.default_rng(0)\n"
        "a = rng.integers(150, 256, size=(8, 64)).astype(np.uint8)\n"
        "for name, lo, hi in (('w8', -127, 128), ('w7', -63, 64)):\n"
        "    w = rng.integers(lo, hi, size=(64, 16)).astype(np.int8)\n"
        "    g = h.make_graph([h.make_node('MatMulInteger', ['a', 'w'], ['y'])], 'g', [h.make_tensor_value_info('a', T.UINT8, [8, 64])],\n"
        "                    [h.make_tensor_value_info('y', T.INT32, [8, 16])], [nh.from_array(w, 'w')])\n"
        "    m = h.make_model(g, opset_imports=[h.make_opsetid('', 21)])\n"
        "    y = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider']).run(None, {'a': a})[0]\n"
        "    np.save(f'{name}_a.npy', a); np.save(f'{name}_w.npy', w); np.save(f'{name}_y.npy', y)\n"
    )
    result = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(script)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    from test_kernel_saturation import exact_dot, vpmaddubsw_dot

    for name, saturates in (("w8", True), ("w7", False)):
        a, w, y = (np.load(tmp_path / f"{name}_{k}.npy") for k in "awy")
        assert np.array_equal(y, vpmaddubsw_dot(a, w))
        assert np.array_equal(y, exact_dot(a, w)) is not saturates


def test_the_engine_verifies_on_an_emulated_avx2_host(ort_engine: Path) -> None:
    result = _emulated("-m", "quest_export.cli", "verify-engine", str(ort_engine))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verified on this host" in result.stderr
