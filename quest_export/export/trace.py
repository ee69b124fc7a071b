"""Trace the quantized UNet to an ONNX graph whose quantizers are ``quest::Mark`` nodes.

Uses torch's TorchScript-based exporter (the one diffusers' own ONNX scripts use), which keeps
autograd-function symbolics, so markers land exactly where the simulation quantizes. Graphs over
2 GB are written with external data and loaded back with it.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from quest.quantize import QuantizedUNet
from quest_export.export.markers import marked_quantizers

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states")
OUTPUT_NAME = "out_sample"
TRACE_OPSET = 20  # the TorchScript exporter's newest; the Q/DQ pass raises the graph to 21


@dataclass
class ExampleInputs:
    """Shapes the graph is traced with (batch, height and width stay dynamic)."""

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.sample, self.timestep, self.encoder_hidden_states


class _TensorUNet(nn.Module):
    """Positional inputs in, the noise prediction tensor out (what the engine computes)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def example_inputs(unet: nn.Module, batch: int = 2, tokens: int | None = None) -> ExampleInputs:
    """Inputs of the UNet's configured size; float timesteps (any scheduler's kind)."""
    config = unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    generator = torch.Generator().manual_seed(0)
    dtype = next(unet.parameters()).dtype
    sample = torch.randn(batch, config.in_channels, size, size, generator=generator, dtype=dtype)
    tokens = tokens or 8
    states = torch.randn(batch, tokens, config.cross_attention_dim, generator=generator, dtype=dtype)
    return ExampleInputs(sample, torch.full((batch,), 500.0), states)


def trace_marked_graph(qunet: QuantizedUNet, inputs: ExampleInputs) -> tuple[onnx.ModelProto, dict[str, nn.Module]]:
    """The float graph with one marker per enabled quantizer, and the marked quantizers by name."""
    unet = qunet.unet
    dynamic = {
        "sample": {0: "batch", 2: "height", 3: "width"},
        "timestep": {0: "batch"},
        "encoder_hidden_states": {0: "batch", 1: "tokens"},
        OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"},
    }
    with tempfile.TemporaryDirectory(prefix="quest-trace-") as tmp, marked_quantizers(unet) as marked, torch.no_grad():
        path = Path(tmp) / "traced.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _TensorUNet(unet).eval(),
                inputs.as_tuple(),
                str(path),
                dynamo=False,
                opset_version=TRACE_OPSET,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
        model = onnx.load(str(path), load_external_data=True)
    return model, dict(marked)


def _quantized_attention(unet: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention_processor import Attention

    from quest.modules import QuantAttnProcessor

    return [m for m in unet.modules() if isinstance(m, Attention) and isinstance(m.processor, QuantAttnProcessor)]


@contextmanager
def _float_attention(unet: nn.Module) -> Iterator[None]:
    """Attention through diffusers' own processor (scaled_dot_product_attention) for the duration."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    swapped = [(m, m.processor) for m in _quantized_attention(unet)]
    try:
        for module, _ in swapped:
            module.set_processor(AttnProcessor2_0())
        yield
    finally:
        for module, processor in swapped:
            module.set_processor(processor)


def trace_float_graph(qunet: QuantizedUNet, inputs: ExampleInputs, marked: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The UNet's FP32 graph, as the float engines ``bench`` compares with are built from it: no
    quantizers, and attention as diffusers computes it. On targets that quantize attention inputs
    the quantized processor's explicit matmuls would hide attention from ONNX Runtime's fused
    attention kernel (bench-unet: ORT FP32 148 vs 117 ms per call), so those are traced again with
    diffusers' processor; otherwise ``marked`` (this UNet's marked graph), when given, is reused."""
    from quest_export.export import passes

    if marked is not None and not _quantized_attention(qunet.unet):
        return passes.strip_markers(marked)
    with _float_attention(qunet.unet):
        traced, _ = trace_marked_graph(qunet, inputs)
    return passes.strip_markers(traced)
