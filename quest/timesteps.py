"""Timestep -> activation-parameter group.

Every activation quantizer may hold one parameter set per timestep group. The mapping from any
integer timestep in [0, num_train_timesteps) to its group is a plain lookup table: the same
table ends up as a constant in the exported graph, so any scheduler and step count work.
"""

from __future__ import annotations

import torch
from torch import nn


def uniform_group_lookup(num_groups: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Evenly sized contiguous groups over [0, num_train_timesteps)."""
    if num_groups < 1:
        raise ValueError("num_groups must be >= 1")
    t = torch.arange(num_train_timesteps)
    return torch.clamp(t * num_groups // num_train_timesteps, max=num_groups - 1).long()


def groups_for(lookup: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
    """Group of each timestep (int or float): ``lookup[clip(round(t), 0, N-1)]``, flattened.
    The exported graph computes exactly this from its ``timestep`` input."""
    t = torch.as_tensor(timestep, device=lookup.device).reshape(-1)
    return lookup[t.round().long().clamp(0, lookup.numel() - 1)]


class TimestepContext(nn.Module):
    """Holds the lookup table and the current per-sample group indices during a forward pass.

    The quantized UNet sets it from its ``timestep`` input (a forward pre-hook); every activation
    quantizer reads ``groups`` from it. Not a parameter of any quantizer, so it is registered
    once, on the UNet.
    """

    def __init__(self, lookup: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("lookup", lookup.long().clone())
        self.groups: torch.Tensor | None = None

    @property
    def num_groups(self) -> int:
        return int(self.lookup.max().item()) + 1

    @property
    def num_train_timesteps(self) -> int:
        return int(self.lookup.numel())

    def group_of(self, timestep: torch.Tensor | float | int, batch: int) -> torch.Tensor:
        """Group index per sample (shape ``(batch,)``) for int or float timesteps."""
        groups = groups_for(self.lookup, timestep)
        return groups.expand(batch) if groups.numel() == 1 else groups

    def set(self, timestep: torch.Tensor | float | int, batch: int) -> None:
        self.groups = self.group_of(timestep, batch)

    def clear(self) -> None:
        self.groups = None
