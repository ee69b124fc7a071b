"""Block-wise distillation (DilateQuant's BKD) as an alternative finetuning loss.

Every top-level block of the UNet (``conv_in``, ``time_embedding``, each down/up block, the mid block,
``conv_out``, ...) is trained to reproduce its FP twin's output *from the FP block's own input*
(teacher forcing): the loss is the mean over blocks of the block-output MSE. Each block's gradient
stays inside the block (short backpropagation paths, all blocks and all timestep groups trained in
one step), and it trains every quantized layer's weights plus every activation scale. It runs in
:class:`quest.finetune.QuestFinetuner` (same resumable state, same deterministic batches).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quest.modules import QuantConv2d, QuantLinear
from quest.quantize import QuantizedUNet
from quest.teacher import run_teacher, to_float


def unet_blocks(unet: nn.Module) -> list[str]:
    """Top-level blocks that hold quantized layers: direct children, ModuleLists expanded."""
    names = []
    for name, child in unet.named_children():
        members = [(f"{name}.{i}", c) for i, c in enumerate(child)] if isinstance(child, nn.ModuleList) else [(name, child)]
        for member_name, member in members:
            if any(isinstance(m, (QuantConv2d, QuantLinear)) for m in member.modules()):
                names.append(member_name)
    return names


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "to_tuple"):  # diffusers BaseOutput
        return _tensors(value.to_tuple())
    return []


@contextmanager
def record_blocks(unet: nn.Module, names: list[str]) -> Iterator[dict[str, tuple[tuple, dict, Any]]]:
    """Capture each block's (args, kwargs, output) during one forward pass."""
    calls: dict[str, tuple[tuple, dict, Any]] = {}
    inputs: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name in names:
        module = unet.get_submodule(name)

        def pre(_m: nn.Module, args: tuple, kwargs: dict, n: str = name) -> None:
            if n in inputs:
                raise RuntimeError(f"block {n} runs more than once per forward; block-wise distillation cannot use it")
            inputs[n] = (args, kwargs)

        def post(_m: nn.Module, _args: tuple, _kwargs: dict, output: Any, n: str = name) -> None:
            calls[n] = (*inputs[n], output)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def blockwise_loss(
    qunet: QuantizedUNet, fp_unet: nn.Module, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor
) -> tuple[torch.Tensor, float, float]:
    """(loss, last block's MSE, mean block MSE): each quantized block run on its FP block's inputs."""
    names = unet_blocks(qunet.unet)
    with torch.no_grad(), record_blocks(fp_unet, names) as calls:
        run_teacher(fp_unet, x, t, states)
    qunet.context.set(t, x.shape[0])  # the UNet's pre-hook does this on a full forward
    losses = []
    try:
        for name in names:
            if name not in calls:
                continue  # a block this model does not run
            args, kwargs, fp_out = to_float(calls[name])  # a low-precision teacher's tensors, as float32
            q_out = qunet.unet.get_submodule(name)(*args, **kwargs)
            pairs = list(zip(_tensors(q_out), _tensors(fp_out)))
            losses.append(torch.stack([F.mse_loss(q, f) for q, f in pairs]).mean())
    finally:
        qunet.context.clear()
    loss = torch.stack(losses).mean()
    return loss, losses[-1].detach().item(), loss.detach().item()
