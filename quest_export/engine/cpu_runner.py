"""What the CPU backends' runners share: a call on numpy arrays (each backend's own) and the call
on torch tensors that ``EngineUNet`` makes."""

from __future__ import annotations

from typing import Any

import numpy as np


class CpuRunner:
    """Base class: subclasses implement ``__call__(sample, timestep, encoder_hidden_states)`` on
    float32 numpy arrays, returning the noise prediction as a numpy array."""

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, encoder_hidden_states: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def run(self, sample: Any, timestep: Any, encoder_hidden_states: Any) -> Any:
        """The same call on torch tensors (what EngineUNet passes), returning a CPU tensor."""
        import torch

        arrays = (np.ascontiguousarray(x.detach().float().cpu().numpy()) for x in (sample, timestep, encoder_hidden_states))
        return torch.from_numpy(self(*arrays))
