"""``--device`` and ``--teacher-dtype``: where PyTorch work runs and in which dtype the frozen
teacher is kept, checked before any model is loaded (one UserError line each).

Quantizer arithmetic always stays float32 (what the engines compute); only the FP teacher used as
the finetuning target may be kept in float16/bfloat16 to halve its memory.
"""

from __future__ import annotations

import re

from quest_export.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
TEACHER_DTYPES = ("float32", "float16", "bfloat16")
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(spec: str | None = "auto") -> str:
    """The torch device string for ``--device`` (auto: the first CUDA GPU when PyTorch sees one)."""
    import torch

    value = (spec or "auto").strip().lower()
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return "cpu"
    match = _CUDA.match(value)
    if match is None:
        raise UserError(f"unknown --device {spec!r}; choose one of: {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        raise UserError(
            f"--device {spec}: PyTorch sees no CUDA GPU on this machine (torch {torch.__version__}, {build} build); "
            "use --device cpu (or auto), or run on a machine with an NVIDIA GPU and a CUDA build of torch"
        )
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(f"--device {spec}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1}); pick one of those")
    return f"cuda:{index}"


def resolve_teacher_dtype(name: str | None):
    """The torch dtype for ``--teacher-dtype`` (None: float32)."""
    import torch

    value = (name or "float32").strip().lower()
    if value not in TEACHER_DTYPES:
        raise UserError(f"unknown --teacher-dtype {name!r}; choose one of: {', '.join(TEACHER_DTYPES)}")
    return getattr(torch, value)


def device_name(device: str) -> str:
    """What a checkpoint records about where it was made (the GPU's model name on CUDA)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device
