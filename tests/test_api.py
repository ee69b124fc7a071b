"""The README's Python API snippet, run exactly as written (from a scratch working directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _snippet(name: str = "api-snippet") -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {name} -->\s*```python\n(.*?)```\s*<!-- /{name} -->", text, re.S)
    assert match, f"README lost its {name} block"
    return match.group(1)


def test_readme_python_api_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(_snippet(), str(README), "exec"), {"__name__": "readme_snippet"})
    printed = capsys.readouterr().out
    assert "torch.Size([10, 1, 16, 16])" in printed
    psnr = float(printed.split()[-1])
    assert psnr >= 40.0  # W8A8: the engine's trajectories within the verification bound of the simulation
    for artifact in ("checkpoint/quant.json", "checkpoint/calibration.json", "engine/manifest.json", "engine/model.ort.onnx"):
        assert (tmp_path / "out/api" / artifact).is_file(), artifact

    from quest_export.api import QuantizedModel

    again = QuantizedModel.from_pretrained(tmp_path / "out/api/checkpoint")
    assert again.meta["bits"] == "w8a8" and again.meta["method"] == "ptq-timestep" and len(again.qunet.layers) > 0


def test_readme_in_memory_unet_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """quantize_unet + export_unet on a UNet built in the snippet: the graph it saves holds Q/DQ
    nodes and passed parity against the simulation."""
    import onnx

    monkeypatch.chdir(tmp_path)
    exec(compile(_snippet("api-snippet-unet"), str(README), "exec"), {"__name__": "readme_snippet"})
    agreement, tensors = capsys.readouterr().out.split()
    assert float(agreement) >= 0.999 and int(tensors) > 0
    ops = {node.op_type for node in onnx.load(str(tmp_path / "my-unet.qdq.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
