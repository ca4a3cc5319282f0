"""World: every piece of rank arithmetic in one place (MosaicML Streaming's idea).

Built once per training process from the environment torch.distributed was started with (Ray Train and
torchrun both set RANK, WORLD_SIZE, LOCAL_RANK). Only this module and cli.py read the environment.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass, field, replace
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


    def expert_placement(self, model_spec, hosts: tuple[Host, ...] = ()) -> ExpertPlacement | None:
        """This rank's ExpertPlacement for a model section with a `moe` field (None for a dense model)."""
        moe = getattr(model_spec, "moe", None)
        if moe is None:
            return None
        if moe.ep_size != self.ep_size:
            raise ValueError(f"model.moe.ep_size={moe.ep_size} in a world built with ep_size={self.ep_size}")
        return ExpertPlacement(moe.num_experts, self.ep_size, self.ep_rank, tuple(hosts))


@dataclass(frozen=True)
class Host:
    hostname: str
    ip: str
    node_id: str | None = None  # Ray's node id: two Ray nodes can share a host


@dataclass(frozen=True)
class ExpertPlacement:
    """Which global experts each EP rank holds, and where the ranks run: built once per process and handed to
    the MoE layers, their dispatcher, the checkpoint manifest, the reshard and serving.

    EP rank e holds the contiguous block of global ids e * E_local .. (e + 1) * E_local - 1; world rank r is
    EP rank r % ep_size (consecutive ranks form an EP group). Under PR-MoE layers differ in expert count:
    `for_experts(n)` is the same placement for a layer of n experts.
    """

    num_experts: int
    ep_size: int = 1
    ep_rank: int = 0  # this process's
    hosts: tuple[Host, ...] = field(default=(), compare=False)  # by world rank; empty when not gathered

    def __post_init__(self) -> None:
        if self.num_experts % self.ep_size or not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"{self.num_experts} experts on EP rank {self.ep_rank} of ep_size={self.ep_size}")

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def local_experts(self) -> range:
        """The global ids this rank holds, in local order."""
        return self.experts_of(self.ep_rank)

    @property
    def first_expert(self) -> int:
        return self.local_experts.start

    def experts_of(self, ep_rank: int) -> range:
        return range(ep_rank * self.num_local, (ep_rank + 1) * self.num_local)

    def ep_rank_of(self, expert: int) -> int:
        return expert // self.num_local

    def ep_rank_of_rank(self, rank: int) -> int:
        return rank % self.ep_size

    def replica_ranks(self, ep_rank: int, world_size: int) -> range:
        """The world ranks holding EP rank ep_rank's experts (its expert-data-parallel group)."""
        return range(ep_rank, world_size, self.ep_size)

    def for_experts(self, num_experts: int) -> ExpertPlacement:
        return replace(self, num_experts=num_experts)

    def at(self, ep_rank: int) -> ExpertPlacement:
        return replace(self, ep_rank=ep_rank)

    def record(self, layers: dict[int, int]) -> dict[str, Any]:
        """The manifest's `placement`: MoE block -> global expert -> EP rank (layers: block -> its expert
        count), and every world rank's EP rank and host."""
        return {
            "ep_size": self.ep_size,
            "num_experts": max(layers.values()),
            "layers": {str(block): {str(e): self.for_experts(n).ep_rank_of(e) for e in range(n)}
                       for block, n in layers.items()},
            "ranks": [{"rank": rank, "ep_rank": self.ep_rank_of_rank(rank), "host": host.hostname, "ip": host.ip,
                       "node_id": host.node_id} for rank, host in enumerate(self.hosts)],
        }


def this_host() -> Host:
    """This process's host; under Ray, the node's IP and id as Ray knows them."""
    hostname = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            return Host(hostname, ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id())
    except ImportError:
        pass
    try:
        return Host(hostname, socket.gethostbyname(hostname))
    except OSError:
        return Host(hostname, "127.0.0.1")


def gather_hosts(world: World) -> tuple[Host, ...]:
    """Every rank's host, in rank order (collective)."""
    mine = this_host()
    hosts = [mine] * world.world_size
    if world.world_size > 1:
        dist.all_gather_object(hosts, mine)
    return tuple(hosts)


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
