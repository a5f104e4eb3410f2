"""Several training processes: DistributedDataParallel over GPUs (NCCL) or, to test that path, CPUs (gloo)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import torch

from cleftchunk.errors import CleftchunkError
from cleftchunk.train.config import TrainConfig


# -- distributed -----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return value
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        return value / self.world_size


def requested_processes(config: TrainConfig) -> tuple[int, bool]:
    """(number of processes, on GPUs?) from -g / cpu_processes and what torch sees."""
    if config.cpu_processes:
        return int(config.cpu_processes), False
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if config.gpus is None:
        return 1, available > 0
    if config.gpus == 0:
        return 1, False
    if config.gpus > available:
        raise CleftchunkError(
            f"-g {config.gpus} asks for {config.gpus} GPU(s) but torch sees {available}: use -g {available} "
            f"({'0 trains on the CPU' if not available else 'or fewer'})"
        )
    return int(config.gpus), True


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(rank: int, world_size: int, local_rank: int, on_gpu: bool) -> Dist:
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu else "gloo", rank=rank, world_size=world_size, init_method="env://"
        )
    return Dist(rank, world_size, local_rank, device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
