"""Expert-parallel serving ranks: Ray actors that form one torch.distributed group and run decode steps SPMD.

    group = await ShardGroup.start(checkpoint, ep_size, bundle_cpus, use_gpu)   # inside a Serve replica
    driver = await group.run(LoopConfig(max_batch=64, max_per_rank=8))          # the step loop starts in rank 0
    loop = StepLoop(driver)                                                     # serve/batching.py

Rank r loads the dense weights and only its experts (serve/weights.py); every step runs the full forward
on every rank, so each MoE layer exchanges tokens with all-to-all exactly as in training (a rank with no
sequences sends and receives nothing, but takes part). Rank 0 opens a TCPStore on a free port and hands
it to the others; all ranks must then call init_process_group at the same time, or it deadlocks.

The step loop runs in rank 0 (batching.DriverLoop, on the actor's `loop` thread): it broadcasts each step's
plans to the other ranks over a gloo group of their own (Channel: one collective each way), steps its share,
and gathers their picks, so a decode step costs no Ray call; the others run `follow` on their `loop` thread.
The replica talks to rank 0 only per request (`submit`, `cancel`) and collects tokens with `poll`, each on a
thread of its own.
Pings run on a concurrency group of their own too, so a long step does not fail a health check.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import pickle
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import ray
from ember.checkpoint.fault import fault_point
from ember.data.tokenizer import checkpoint_tokenizer
from ember.generation.decode import DecodeRunner, Picked, StepPlan
from ember.generation.precision import dtype_name, generation_dtype
from ember.models.layers.moe.dispatch import set_max_tokens
from ember.serve.batching import POLL_S, DriverLoop, Polled, Request, Scheduler
from ember.serve.memory import free_memory_bytes
from ember.world import World, backend_for, resolve_device

GROUP_TIMEOUT = datetime.timedelta(seconds=60)  # a dead rank unblocks the others' collectives after this
START_TIMEOUT_S = 300.0
CONCURRENCY = {"loop": 1, "control": 1, "poll": 1, "health": 1}  # one thread each, beside the default's


@dataclass(frozen=True)
class LoopConfig:
    max_batch: int = 64  # running sequences, all ranks together
    max_per_rank: int | None = None  # what each rank's KV-cache budget holds


class Channel:
    """Python objects between rank 0 and the others in one fixed-size gloo collective each way.

    torch's broadcast_object_list and gather_object take two collectives each (sizes, then bytes); on these
    cores each collective costs a wake-up of every rank. Here every message is a fixed block whose first 8
    bytes give the pickle's length; the rare pickle longer than a block sends the rest point-to-point, which
    both sides know to expect from that length.
    """

    BLOCK = 16384  # bytes: the plans of a typical step, and any rank's picks, fit

    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroup) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group

    def _pack(self, value: Any) -> tuple[torch.Tensor, bytes]:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        block = torch.zeros(self.BLOCK, dtype=torch.uint8)
        head = len(data).to_bytes(8, "little") + data[: self.BLOCK - 8]
        block[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        return block, data[self.BLOCK - 8 :]

    def _unpack(self, block: torch.Tensor, rest: Callable[[int], bytes]) -> Any:
        raw = block.numpy().tobytes()
        length = int.from_bytes(raw[:8], "little")
        data = raw[8 : 8 + length]
        if length > len(data):
            data += rest(length - len(data))
        return pickle.loads(data)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (the others pass anything)."""
        block, rest = self._pack(value) if self.rank == 0 else (torch.empty(self.BLOCK, dtype=torch.uint8), b"")
        dist.broadcast(block, src=0, group=self.group)
        if self.rank == 0:
            if rest:
                dist.broadcast(torch.frombuffer(bytearray(rest), dtype=torch.uint8), src=0, group=self.group)
            return value

        def more(size: int) -> bytes:
            tail = torch.empty(size, dtype=torch.uint8)
            dist.broadcast(tail, src=0, group=self.group)
            return tail.numpy().tobytes()

        return self._unpack(block, more)

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value`, in rank order, on rank 0 (None on the others)."""
        if self.rank == 0:  # its own value stays here
            block, rest = torch.zeros(self.BLOCK, dtype=torch.uint8), b""
            blocks = [torch.empty(self.BLOCK, dtype=torch.uint8) for _ in range(self.world_size)]
        else:
            (block, rest), blocks = self._pack(value), None
        dist.gather(block, blocks, dst=0, group=self.group)
        if self.rank != 0:
            if rest:
                dist.send(torch.frombuffer(bytearray(rest), dtype=torch.uint8), dst=0, group=self.group)
            return None
        values = []
        for source, part in enumerate(blocks):
            def more(size: int, source: int = source) -> bytes:
                tail = torch.empty(size, dtype=torch.uint8)
                dist.recv(tail, src=source, group=self.group)
                return tail.numpy().tobytes()

            values.append(value if source == 0 else self._unpack(part, more))
        return values


class ExpertShard:
    """One serving rank (a Ray actor)."""

    def __init__(self, checkpoint: str, rank: int, world_size: int, dtype: str = "auto", threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.checkpoint, self.rank, self.world_size, self.dtype_choice = checkpoint, rank, world_size, dtype
        self.device = resolve_device("auto")
        self.store: dist.TCPStore | None = None
        self.runner: DecodeRunner | None = None
        self.channel: Channel | None = None  # plans out, picks back: gloo, whatever the device
        self.driver: DriverLoop | None = None  # rank 0's step loop
        self.tokenizer = None
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
            self.channel = Channel(self.rank, self.world_size, dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT))
        model, spec = load_rank_model(self.checkpoint, self.world_size, self.rank, verify=False)  # verified once
        model.to(generation_dtype(self.dtype_choice, self.device, spec.engine.precision))  # weights, so KV cache
        if self.world_size > 1:
            world = World(self.rank, self.world_size, 0, self.device, backend_for(self.device), self.world_size)
            attach_expert_groups(model, world)  # every serving rank is one EP rank
        self.runner = DecodeRunner(model.to(self.device), self.device)
        if self.rank == 0:
            self.tokenizer = checkpoint_tokenizer(self.checkpoint, spec)  # the driver's stop strings
        return self.describe()

    # ---- the step loop (rank 0 drives, the others follow) ----
    def configure(self, config: LoopConfig) -> None:
        """Rank 0, before `run`: the driver the replica's requests go to."""
        model = self.runner.model.spec
        scheduler = Scheduler(self.world_size, model.seq_len, config.max_batch, config.max_per_rank, self.tokenizer)
        self.driver = DriverLoop(self.step_all, scheduler, idle=self.beat if self.world_size > 1 else None)

    @ray.method(concurrency_group="loop")
    def run(self) -> None:
        """Rank 0 drives steps until the actor dies; the others follow its plans. Returns only on failure."""
        if self.rank == 0:
            self.driver.run()
        else:
            self.follow()

    def step_all(self, plans: list[StepPlan]) -> dict[int, Picked]:
        """Rank 0: one step on every rank; every rank's picks (two gloo collectives beside the step's own)."""
        if self.world_size == 1:
            return self.step(plans[0])
        self.channel.broadcast(plans)
        picked = self.step_of(plans)
        return {seq_id: token for part in self.channel.gather(picked) for seq_id, token in part.items()}

    def beat(self) -> None:
        """Rank 0, idle: a message that is not a step, so the others' wait never times out."""
        self.channel.broadcast(None)

    def follow(self) -> None:
        while True:
            plans = self.channel.broadcast(None)
            if plans is not None:
                self.channel.gather(self.step_of(plans))

    def step_of(self, plans: list[StepPlan]) -> dict[int, Picked]:
        """This rank's share of a step every rank knows the plans of: each MoE layer then exchanges its counts
        and rows in one padded all-to-all bounded by the most tokens any rank feeds (dispatch.py)."""
        set_max_tokens(self.runner.model, max(sum(len(a.prompt) for a in p.admit) + len(p.decode) for p in plans))
        return self.step(plans[self.rank])

    def step(self, plan: StepPlan) -> dict[int, Picked]:
        self.steps += 1
        fault_point("serve_step", self.rank, self.steps)  # tests hold a step here as long as they need
        return self.runner.step(plan)

    # ---- the replica's calls to rank 0, each on a thread of its own ----
    @ray.method(concurrency_group="control")
    def submit(self, requests: list[Request]) -> None:
        self.driver.submit(requests)

    @ray.method(concurrency_group="control")
    def cancel(self, seq_id: int) -> None:
        self.driver.cancel(seq_id)

    @ray.method(concurrency_group="poll")
    def poll(self, timeout_s: float) -> Polled:
        return self.driver.poll(timeout_s)

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
        self.loops: list[asyncio.Future] = []

    @classmethod
    async def start(cls, checkpoint: str, world_size: int, bundle_cpus: float, use_gpu: bool,
                    dtype: str = "auto") -> ShardGroup:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = ray.util.get_current_placement_group()
        remote = ray.remote(concurrency_groups=CONCURRENCY)(ExpertShard)
        actors = []
        for rank in range(world_size):
            placement = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
            options = {"num_cpus": bundle_cpus, "num_gpus": 1 if use_gpu else 0, "scheduling_strategy": placement}
            actors.append(remote.options(**options).remote(checkpoint, rank, world_size, dtype))
        host, port = await actors[0].open_store.remote()
        joins = [actor.join.remote(host, port) for actor in actors]  # concurrently: init_process_group blocks
        descriptions = await asyncio.wait_for(asyncio.gather(*joins), START_TIMEOUT_S)
        return cls(actors, list(descriptions))

    async def run(self, config: LoopConfig) -> RankDriver:
        """Start the step loop on every rank; the driver the replica's StepLoop talks to."""
        await self.actors[0].configure.remote(config)
        self.loops = [asyncio.ensure_future(actor.run.remote()) for actor in self.actors]
        return RankDriver(self.actors[0])

    def failure(self) -> str | None:
        """Why a rank's loop ended (it runs until its actor dies), or None while all run."""
        for rank, loop in enumerate(self.loops):
            if loop.done():
                error = None if loop.cancelled() else loop.exception()
                return f"rank {rank}'s step loop ended: {error or 'returned'}"
        return None

    async def ping(self, timeout_s: float) -> None:
        await asyncio.wait_for(asyncio.gather(*(actor.ping.remote() for actor in self.actors)), timeout_s)

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


class RankDriver:
    """batching.Driver for a DriverLoop in rank 0's actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def submit(self, request: Request) -> None:
        self.actor.submit.remote([request])

    def cancel(self, seq_id: int) -> None:
        self.actor.cancel.remote(seq_id)

    async def poll(self) -> Polled:
        return await self.actor.poll.remote(POLL_S)
