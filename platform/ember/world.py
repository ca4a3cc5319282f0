"""World: every piece of rank arithmetic in one place (MosaicML Streaming's idea).

Built once per training process from the environment torch.distributed was started with (Ray Train and
torchrun both set RANK, WORLD_SIZE, LOCAL_RANK). Only this module and cli.py read the environment.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ember.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    ep_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel size of dense parameters: every rank sees different data."""
        return self.world_size

    @property
    def ep_rank(self) -> int:
        """Rank within the expert-parallel group (DeepSpeed's layout: consecutive ranks share a group)."""
        return self.rank % self.ep_size

    @property
    def expert_dp_size(self) -> int:
        """Replicas of each expert: the data-parallel size of expert parameters."""
        return self.world_size // self.ep_size

    @functools.cached_property
    def expert_groups(self) -> tuple[Any, Any]:
        """(expert-parallel group, expert-data-parallel group) of this rank: consecutive ranks form an EP group
        (ep_rank = rank % ep_size), the ranks holding the same experts an expert-data-parallel group. Created on
        first use, by every rank (torch's new_group is collective); (None, None) without expert parallelism."""
        if self.ep_size == 1:
            return None, None
        parallel = data = None
        for first in range(0, self.world_size, self.ep_size):
            group = dist.new_group(list(range(first, first + self.ep_size)))
            parallel = group if first <= self.rank < first + self.ep_size else parallel
        for ep_rank in range(self.ep_size):
            group = dist.new_group(list(range(ep_rank, self.world_size, self.ep_size)))
            data = group if ep_rank == self.ep_rank else data
        return parallel, data

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """auto -> cuda when this process sees a GPU, else cpu; cuda without a GPU is a user error."""
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise UserError("cluster.device=cuda but this worker sees no GPU; use device: auto or cpu")
    if requested == "cuda" or (requested == "auto" and has_cuda):
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def world_from_env(device: str = "auto", ep_size: int = 1) -> World:
    """Describe this process's place in the job; starts the process group when the launcher did not."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device, local_rank)
    backend = backend_for(torch_device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return World(rank, world_size, local_rank, torch_device, backend, ep_size)


def local_world(device: str = "cpu") -> World:
    """A one-process world (generation, export, tests) with its own process group on a free port."""
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    torch_device = resolve_device(device)
    return World(0, 1, 0, torch_device, backend_for(torch_device))
