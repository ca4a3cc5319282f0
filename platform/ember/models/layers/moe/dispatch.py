"""Token dispatch: routes sorted by expert (no one-hot einsum, no padded capacity buffer), and for expert
parallelism an all-to-all with variable split sizes over the expert-parallel group.

    permute     x [S, d] -> rows [R, d] grouped by global expert id (dropped routes left out)
    exchange    rows grouped by global expert -> this rank's rows grouped by local expert (all-to-all)
                (counts first, then rows; or, in inference under a row bound every rank knows, one padded
                exchange whose first row per peer carries the counts: see `bounded`)
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
BOUNDED_ROWS = 512  # rows per peer up to which one padded exchange beats a counts exchange plus an exact one


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
        # Inference only, set by serving ranks for each step, the same on every rank: no rank feeds more tokens
        # than this, so none sends a peer more than max_tokens x k rows, and counts and rows can travel in one
        # padded exchange instead of two (up to BOUNDED_ROWS rows per peer; past that, padding costs more).
        self.max_tokens: int | None = None

    def __call__(self, x: torch.Tensor, routing: Routing, experts: ExpertFn) -> torch.Tensor:
        counts = routing.counts.tolist()  # the one host sync: segment sizes and split sizes are host values
        rows = routing_rows(routing, sum(counts))
        grouped = x.index_select(0, torch.div(rows, routing.experts.shape[1], rounding_mode="floor"))
        if self.ep_size == 1:
            outputs = experts(grouped, counts)
        else:
            outputs = self._exchange(grouped, routing.counts, experts, routing.experts.shape[1])
        return unpermute(outputs, rows, routing.weights)

    def _exchange(self, grouped: torch.Tensor, counts: torch.Tensor, experts: ExpertFn, k: int) -> torch.Tensor:
        if self.group is None:
            raise RuntimeError("expert parallelism needs its process group: attach_expert_groups(model, world) first")
        send = counts.view(self.ep_size, self.num_local).sum(1).tolist()
        bound = None if self.max_tokens is None or torch.is_grad_enabled() else self.max_tokens * k
        if bound is not None and bound <= BOUNDED_ROWS:  # the same decision on every rank: no local data in it
            received, arrived = self._bounded(grouped, counts, send, bound)
        else:
            received = exchange_counts(counts, self.group)  # [ep_size, num_local]: what each rank sends here
            arrived = AllToAll.apply(grouped, received.sum(1).tolist(), send, self.group)
        recv = received.sum(1).tolist()
        order = local_expert_order(received)
        outputs = experts(arrived.index_select(0, order), received.sum(0).tolist())
        back = torch.empty_like(outputs).index_copy(0, order, outputs)  # autograd-friendly inverse of the sort
        return AllToAll.apply(back, send, recv, self.group)


    def _bounded(self, grouped: torch.Tensor, counts: torch.Tensor, send: list[int], bound: int) -> tuple:
        """One all-to-all of [1 + bound] rows per peer: row 0 holds the counts for that peer's experts (as int32
        bits), the rest its rows, zero-padded. Returns (received counts [ep_size, num_local], arrived rows)."""
        if max(send) > bound:
            raise RuntimeError(f"{max(send)} rows for one peer, over the step's bound of {bound}")
        width = grouped.shape[1]
        header = counts.to(torch.int32).view(self.ep_size, self.num_local)
        if width * grouped.element_size() < 4 * self.num_local:  # no room for the counts in one row
            raise ValueError(f"d_model {width} too narrow to carry {self.num_local} counts")
        out = grouped.new_zeros((self.ep_size, 1 + bound, width))
        out[:, 0].view(torch.uint8)[:, : 4 * self.num_local] = header.contiguous().view(torch.uint8)
        starts = [0, *torch.tensor(send).cumsum(0).tolist()]
        for peer in range(self.ep_size):
            out[peer, 1 : 1 + send[peer]] = grouped[starts[peer] : starts[peer + 1]]
        into = torch.empty_like(out)
        with torch.profiler.record_function(ALL_TO_ALL):
            dist.all_to_all_single(into, out, group=self.group)
        received = into[:, 0].contiguous().view(torch.uint8)[:, : 4 * self.num_local].contiguous().view(torch.int32)
        received = received.to(counts.dtype)
        sizes = received.sum(1).tolist()
        arrived = torch.cat([into[peer, 1 : 1 + sizes[peer]] for peer in range(self.ep_size)])
        return received, arrived


def set_max_tokens(model: torch.nn.Module, max_tokens: int | None) -> None:
    """Every token dispatcher of `model`: no rank of its group feeds more than `max_tokens` tokens in the next
    forwards (inference; the same value on every rank), or None (unknown: the exact two-exchange path)."""
    for module in model.modules():
        dispatcher = getattr(module, "dispatcher", None)
        if isinstance(dispatcher, TokenDispatcher):
            dispatcher.max_tokens = max_tokens


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
