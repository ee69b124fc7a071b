"""Data parallelism for finetuning: ``torchrun`` sets the environment, gloo on CPU, NCCL on GPU.

Calibration rows are sharded over ranks, gradients are averaged with all-reduce, only rank 0
writes. With equal shard sizes the averaged gradient equals the gradient of the combined batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    reduce_device: str = "cpu"  # NCCL reduces CUDA tensors only

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's equal share of a batch of row indices (the batch must divide evenly)."""
        if not self.active:
            return indices
        if indices.numel() % self.world_size:
            raise ValueError(f"batch of {indices.numel()} rows does not split evenly over {self.world_size} ranks")
        return indices.view(self.world_size, -1)[self.rank]

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        if not self.active:
            return
        for param in params:
            if param.grad is not None:
                dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
                param.grad.div_(self.world_size)

    def average(self, value: float) -> float:
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.reduce_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item() / self.world_size)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_from_env() -> DistContext:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    nccl = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if nccl else "gloo")
    reduce_device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if nccl else "cpu"
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), reduce_device=reduce_device)


def rank_device(context: DistContext, device: str) -> str:
    """Under torchrun each rank takes its own GPU (cuda:LOCAL_RANK) when the run is on CUDA."""
    if context.active and device.startswith("cuda"):
        return context.reduce_device
    return device
