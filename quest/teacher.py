"""The frozen FP teacher of the finetuning losses, optionally kept in float16/bfloat16.

A low-precision teacher halves the memory of the second UNet copy; its inputs are cast down and
everything the losses read from it (final output, captured layer/block tensors) is cast back to
float32, so the student and the quantizer arithmetic stay float32 throughout.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def fp_copy(unet: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An FP twin of a not-yet-quantized UNet in ``dtype`` (targets for the distillation losses)."""
    twin = copy.deepcopy(unet).eval()
    return twin.to(dtype) if dtype != torch.float32 else twin


def teacher_dtype(teacher: nn.Module) -> torch.dtype:
    return next(teacher.parameters()).dtype


def to_float(value: Any) -> Any:
    """``value`` with every floating tensor inside (tuples, lists, dicts) cast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(to_float(v) for v in value)
    if isinstance(value, dict):
        return {k: to_float(v) for k, v in value.items()}
    return value


def run_teacher(teacher: nn.Module, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """The teacher's noise prediction in float32, whatever dtype it is kept in."""
    dtype = teacher_dtype(teacher)
    return teacher(x.to(dtype), t, encoder_hidden_states=states.to(dtype)).sample.float()
