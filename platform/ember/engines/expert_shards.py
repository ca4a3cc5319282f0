"""Expert parallelism without DeepSpeed: ember's stacked experts under DDP.

Each EP rank holds a slice of every MoE layer's stacked expert tensors (experts ep_rank * E_local onward),
so DDP must not average them over all ranks. DDP ignores them; after the last micro-batch their gradients
are summed over the expert-data-parallel group (the ranks holding the same experts) and divided by the
world size, which is DDP's mean over all ranks of the loss (every rank's tokens reached these experts
through the all-to-all). Checkpoints hold them whole, in ep_size 1 layout (all-gathered over the EP
group: slices of a stacked tensor concatenate along dim 0), so any world and EP size loads them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ember.errors import UserError
from ember.models.layers.moe import is_expert_parameter
from ember.world import World


class ExpertShards:
    def __init__(self, model: nn.Module, world: World) -> None:
        self.params = {name: p for name, p in model.named_parameters() if is_expert_parameter(p)}
        if any(name.rsplit(".", 1)[-1] not in ("w_in", "b_in", "w_out", "b_out") for name in self.params):
            raise UserError("model.moe.ep_size > 1 on this engine needs model.moe.impl: ember (stacked experts)")
        self.ep_size, self.ep_rank, self.world_size = world.ep_size, world.ep_rank, world.world_size
        self.parallel_group, self.data_group = world.expert_groups

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def reduce_gradients(self) -> None:
        params = list(self.params.values())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.data_group)
        flat.div_(self.world_size)
        for param, synced in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
            param.grad = synced

    def clip_grad_norm(self, module: nn.Module, max_norm: float) -> float:
        """torch's clip_grad_norm_ over the whole model: dense gradients once (they are equal on every rank),
        each expert's from the EP rank holding it, so every rank scales by the same factor."""
        dense = [p.grad for p in module.parameters() if p.grad is not None and not is_expert_parameter(p)]
        experts = [p.grad for p in self.params.values() if p.grad is not None]
        squares = [torch.nn.utils.get_total_norm(part).double() ** 2 for part in (dense, experts) if part]
        expert_squares = squares.pop() if experts else torch.zeros((), dtype=torch.float64)
        dist.all_reduce(expert_squares, group=self.parallel_group)
        total = (sum(squares) + expert_squares).sqrt().float()
        torch.nn.utils.clip_grads_with_norm_(module.parameters(), max_norm, total)  # parameters, not grads
        return float(total)

    def whole(self, local: torch.Tensor) -> torch.Tensor:
        """All EP ranks' slices of one stacked tensor, in expert order (collective over the EP group)."""
        parts = [torch.empty_like(local) for _ in range(self.ep_size)]
        dist.all_gather(parts, local.contiguous(), group=self.parallel_group)
        return torch.cat(parts)

    def local(self, whole: torch.Tensor) -> torch.Tensor:
        return whole.chunk(self.ep_size)[self.ep_rank].clone()

    def model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.whole(value) if name in self.params else value for name, value in state.items()}

    def load_model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.local(value) if name in self.params else value for name, value in state.items()}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """optimizer.state_dict() with every expert tensor's moments whole (collective)."""
        state = optimizer.state_dict()
        for index in self._expert_indices(optimizer):
            moments = state["state"].get(index, {})
            state["state"][index] = {k: self.whole(v) if v.dim() else v for k, v in sorted(moments.items())}
        return state

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        for index in self._expert_indices(optimizer):
            moments = state["state"].get(index, {})
            state["state"][index] = {k: self.local(v) if v.dim() else v for k, v in moments.items()}
        return state

    def _expert_indices(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """Indices state_dict() gives the expert parameters (it numbers parameters group by group)."""
        expert_ids = {id(p) for p in self.params.values()}
        ordered = [p for group in optimizer.param_groups for p in group["params"]]
        return [index for index, p in enumerate(ordered) if id(p) in expert_ids]
