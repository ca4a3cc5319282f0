"""Token dispatch: routes sorted by expert (no one-hot einsum, no padded capacity buffer), and for expert
parallelism an all-to-all with variable split sizes over the expert-parallel group.

    permute     x [S, d] -> rows [R, d] grouped by global expert id (dropped routes left out)
    exchange    rows grouped by global expert -> this rank's rows grouped by local expert (all-to-all)
    experts     grouped rows -> outputs, per expert segment
    return      the reverse all-to-all
    unpermute   outputs back to route order, weighted and summed over each token's k routes

Every step is deterministic: stable sorts keep token order within an expert, and the combine is a gather
plus a fixed-order sum rather than an atomic scatter-add.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ember.models.layers.moe.router import Routing
from ember.world import ExpertPlacement

ExpertFn = Callable[[torch.Tensor, list[int]], torch.Tensor]  # (rows grouped by local expert, counts) -> outputs
ALL_TO_ALL = "ember.moe.all_to_all"  # profiler label of every exchange (bench/moe_ep.py sums them)


class AllToAll(torch.autograd.Function):
    """all_to_all_single with split sizes; its gradient is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        with torch.profiler.record_function(ALL_TO_ALL):
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        out_splits, in_splits = ctx.splits
        return AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


class TokenDispatcher:
    """Moves tokens to their experts and back; holds the expert-parallel group (None when ep_size is 1)."""

    def __init__(self, placement: ExpertPlacement) -> None:
        self.num_experts, self.ep_size, self.num_local = placement.num_experts, placement.ep_size, placement.num_local
        self.group = None

    def __call__(self, x: torch.Tensor, routing: Routing, experts: ExpertFn) -> torch.Tensor:
        counts = routing.counts.tolist()  # the one host sync: segment sizes and split sizes are host values
        rows = routing_rows(routing, sum(counts))
        grouped = x.index_select(0, torch.div(rows, routing.experts.shape[1], rounding_mode="floor"))
        if self.ep_size == 1:
            outputs = experts(grouped, counts)
        else:
            outputs = self._exchange(grouped, routing.counts, experts)
        return unpermute(outputs, rows, routing.weights)

    def _exchange(self, grouped: torch.Tensor, counts: torch.Tensor, experts: ExpertFn) -> torch.Tensor:
        if self.group is None:
            raise RuntimeError("expert parallelism needs its process group: attach_expert_groups(model, world) first")
        received = exchange_counts(counts, self.group)  # [ep_size, num_local]: what each rank sends here
        send = counts.view(self.ep_size, self.num_local).sum(1).tolist()
        recv = received.sum(1).tolist()
        arrived = AllToAll.apply(grouped, recv, send, self.group)
        order = local_expert_order(received)
        outputs = experts(arrived.index_select(0, order), received.sum(0).tolist())
        back = torch.empty_like(outputs).index_copy(0, order, outputs)  # autograd-friendly inverse of the sort
        return AllToAll.apply(back, send, recv, self.group)


def routing_rows(routing: Routing, kept: int) -> torch.Tensor:
    """Route indices (token * k + choice) of the kept routes, sorted by expert id."""
    order = torch.argsort(routing.experts.flatten(), stable=True)  # dropped routes (id = E) sort last
    return order[:kept]


def unpermute(outputs: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[R, d] expert outputs of the kept routes -> [S, d]: sum over k of weight * output (fp32 weights)."""
    tokens, k = weights.shape
    routes = outputs.new_zeros((tokens * k, outputs.shape[1])).index_copy(0, rows, outputs)
    combined = (routes.view(tokens, k, outputs.shape[1]) * weights.unsqueeze(-1)).sum(dim=1)  # 0 tokens: no -1
    return combined.to(outputs.dtype)


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Every rank's per-expert counts for the experts this rank holds: [ep_size, num_local]."""
    world = dist.get_world_size(group)
    received = torch.empty_like(counts)
    with torch.profiler.record_function(ALL_TO_ALL):
        dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received.view(world, -1)


def local_expert_order(received: torch.Tensor) -> torch.Tensor:
    """Rows arrive grouped by (source rank, local expert); this order regroups them by (local expert, source)."""
    num_local = received.shape[1]
    expert_of_row = torch.arange(num_local, device=received.device).repeat(received.shape[0])
    expert_of_row = torch.repeat_interleave(expert_of_row, received.flatten())
    return torch.argsort(expert_of_row, stable=True)
