"""Quantizer markers: how the exporter learns where every quantizer sits in the ONNX graph.

During export each quantizer's forward is swapped for an identity autograd function whose ONNX
symbolic is a ``quest::Mark`` node carrying the quantizer's module name. The float graph then
holds one marker exactly where the simulation quantizes (inputs, weights, tied outputs, attention
q/k/v/probabilities), and the Q/DQ pass replaces each marker with the target's nodes. The name
mapping from torch modules to ONNX tensors is therefore exact, never guessed from node names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from quest.quantizers import ActivationQuantizer, TiedOutputQuantizer, WeightQuantizer

MARK_DOMAIN = "quest"
MARK_OP = "Mark"


class _Mark(torch.autograd.Function):
    """Identity in torch; a ``quest::Mark(name, kind)`` node in the exported graph."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str, kind: str) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def symbolic(g, x, name: str, kind: str):  # legacy (TorchScript) exporter hook
        out = g.op(f"{MARK_DOMAIN}::{MARK_OP}", x, name_s=name, kind_s=kind)
        out.setType(x.type())  # keep shape/dtype so downstream symbolics (conv) still see them
        return out


def quantizer_kind(module: nn.Module) -> str | None:
    if isinstance(module, WeightQuantizer):
        return "weight"
    if isinstance(module, TiedOutputQuantizer):
        return "output"
    if isinstance(module, ActivationQuantizer):
        return "activation"
    return None


@contextmanager
def marked_quantizers(unet: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """Within the block, every enabled quantizer of ``unet`` emits a marker instead of quantizing.

    Yields ``{module name: quantizer}`` of the marked quantizers. Disabled quantizers stay
    identities (no marker), exactly as in the simulation.
    """
    marked: dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        kind = quantizer_kind(module)
        if kind is None or not module.enabled:
            continue
        if kind == "output" and not module.active:
            continue
        marked[name] = module
        module.forward = (lambda x, _n=name, _k=kind: _Mark.apply(x, _n, _k))  # instance override
    try:
        yield marked
    finally:
        for module in marked.values():
            del module.forward
