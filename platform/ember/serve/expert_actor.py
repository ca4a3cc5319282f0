"""Expert-parallel serving ranks: Ray actors that form one torch.distributed group and run decode steps SPMD.

    group = ShardGroup.start(checkpoint, ep_size, bundle_cpus)   # inside a Serve replica with a placement group
    tokens = await group.step(plans)                              # one StepPlan per rank, every rank steps

Rank r loads the dense weights and only its experts (serve/weights.py); every step runs the full forward
on every rank, so each MoE layer exchanges tokens with all-to-all exactly as in training (a rank with no
sequences sends and receives nothing, but takes part). Rank 0 opens a TCPStore on a free port and hands
it to the others; all ranks must then call init_process_group at the same time, or it deadlocks. Pings run
on a concurrency group of their own (a thread beside the steps'), so a long step does not fail a health check.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

import ray
from ember.checkpoint.fault import fault_point
from ember.generation.decode import DecodeRunner, Picked, StepPlan
from ember.generation.precision import dtype_name, generation_dtype
from ember.serve.memory import free_memory_bytes
from ember.world import World, backend_for, resolve_device

GROUP_TIMEOUT = datetime.timedelta(seconds=60)  # a dead rank unblocks the others' collectives after this
START_TIMEOUT_S = 300.0


class ExpertShard:
    """One serving rank (a Ray actor)."""

    def __init__(self, checkpoint: str, rank: int, world_size: int, dtype: str = "auto", threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.checkpoint, self.rank, self.world_size, self.dtype_choice = checkpoint, rank, world_size, dtype
        self.device = resolve_device("auto")
        self.store: dist.TCPStore | None = None
        self.runner: DecodeRunner | None = None
        self.steps = 0

    def open_store(self) -> tuple[str, int]:
        """Rank 0: a TCPStore on a free port of this node; returns (host, port) for the others."""
        host = ray.util.get_node_ip_address()  # not 127.0.0.1: the ranks may sit on several nodes
        self.store = dist.TCPStore(host, 0, self.world_size, is_master=True, wait_for_workers=False)
        return host, self.store.port

    def join(self, host: str, port: int) -> dict[str, Any]:
        """Join the process group (all ranks at once), then load this rank's weights."""
        from ember.engines.expert_groups import attach_expert_groups
        from ember.serve.weights import load_rank_model

        if self.world_size > 1:
            store = self.store or dist.TCPStore(host, port, self.world_size, is_master=False)
            backend = backend_for(self.device)
            dist.init_process_group(
                backend, store=store, rank=self.rank, world_size=self.world_size, timeout=GROUP_TIMEOUT
            )
        model, spec = load_rank_model(self.checkpoint, self.world_size, self.rank, verify=False)  # verified once
        model.to(generation_dtype(self.dtype_choice, self.device, spec.engine.precision))  # weights, so KV cache
        if self.world_size > 1:
            world = World(self.rank, self.world_size, 0, self.device, backend_for(self.device), self.world_size)
            attach_expert_groups(model, world)  # every serving rank is one EP rank
        self.runner = DecodeRunner(model.to(self.device), self.device)
        return self.describe()

    def step(self, plan: StepPlan) -> dict[int, Picked]:
        self.steps += 1
        fault_point("serve_step", self.rank, self.steps)  # tests hold a step here as long as they need
        return self.runner.step(plan)

    def describe(self) -> dict[str, Any]:
        """What this rank holds: its global experts per MoE block and the number of expert parameters."""
        from ember.models.layers.moe import is_expert_parameter

        model = self.runner.model
        params = list(model.parameters())
        experts = {
            index: list(block.ffn.placement.local_experts)
            for index, block in enumerate(model.blocks)
            if hasattr(block.ffn, "placement")
        }
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "experts": experts,
            "expert_parameters": sum(p.numel() for p in params if is_expert_parameter(p)),
            "dense_parameters": sum(p.numel() for p in params if not is_expert_parameter(p)),
            "device": str(self.device),
            "dtype": dtype_name(next(model.parameters()).dtype),
            "free_memory_bytes": free_memory_bytes(self.device),  # after the weights: the KV-cache default's base
            "memory_pool": f"{ray.get_runtime_context().get_node_id()}/{self.device}",
            "host": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(),
        }

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        return self.runner is not None


class ShardGroup:
    """The ranks of one replica: rank r in bundle r of the replica's placement group (bundle 0 also holds the
    replica itself)."""

    def __init__(self, actors: list[Any], descriptions: list[dict[str, Any]]) -> None:
        self.actors, self.descriptions = actors, descriptions

    @classmethod
    async def start(cls, checkpoint: str, world_size: int, bundle_cpus: float, use_gpu: bool,
                    dtype: str = "auto") -> ShardGroup:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = ray.util.get_current_placement_group()
        remote = ray.remote(concurrency_groups={"health": 1})(ExpertShard)
        actors = []
        for rank in range(world_size):
            placement = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
            options = {"num_cpus": bundle_cpus, "num_gpus": 1 if use_gpu else 0, "scheduling_strategy": placement}
            actors.append(remote.options(**options).remote(checkpoint, rank, world_size, dtype))
        host, port = await actors[0].open_store.remote()
        joins = [actor.join.remote(host, port) for actor in actors]  # concurrently: init_process_group blocks
        descriptions = await asyncio.wait_for(asyncio.gather(*joins), START_TIMEOUT_S)
        return cls(actors, list(descriptions))

    async def step(self, plans: list[StepPlan]) -> dict[int, Picked]:
        calls = [actor.step.remote(plan) for actor, plan in zip(self.actors, plans, strict=True)]
        results = await asyncio.gather(*calls)
        return {seq_id: token for picked in results for seq_id, token in picked.items()}

    async def ping(self, timeout_s: float) -> None:
        await asyncio.wait_for(asyncio.gather(*(actor.ping.remote() for actor in self.actors)), timeout_s)

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
