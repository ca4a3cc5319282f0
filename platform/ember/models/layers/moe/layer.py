"""MoE FFN: DeepSpeed's MoE layer for now (ember's own router/dispatcher/experts replace it later).

Every expert is initialised from a generator seeded by its *global* expert id, so a model built with
ep_size=2 holds exactly the experts a model built with ep_size=1 holds, split in two. DeepSpeed would
otherwise deep-copy one expert into every slot (identical experts on every rank).
"""

from __future__ import annotations

import torch
from torch import nn

from ember.models.layers.mlp import MLP
from ember.spec.model import MoESpec


def is_expert_parameter(param: nn.Parameter) -> bool:
    """DeepSpeed marks expert parameters with allreduce=False (they reduce over expert-data-parallel groups)."""
    return not getattr(param, "allreduce", True)


class MoEFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int, spec: MoESpec, ep_rank: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE  # deferred: importing deepspeed costs ~2 s

        self.num_local_experts = spec.num_experts // spec.ep_size
        self.first_expert = ep_rank * self.num_local_experts
        self.moe = MoE(
            hidden_size=d_model,
            expert=MLP(d_model, d_ff, dropout),
            num_experts=spec.num_experts,
            ep_size=spec.ep_size,
            k=spec.top_k,
            capacity_factor=spec.capacity_factor,
            eval_capacity_factor=spec.eval_capacity_factor,
            min_capacity=spec.min_capacity,
            drop_tokens=spec.drop_tokens,
            use_rts=False,  # random token selection makes routing depend on RNG state; ember keeps it deterministic
        )

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def init_experts(self, seed: int, layer: int, init_fn) -> None:
        for local, expert in enumerate(self.local_experts):
            generator = torch.Generator().manual_seed(hash_seed(seed, layer, self.first_expert + local))
            init_fn(expert, generator)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, aux_loss, _ = self.moe(x)
        return out, aux_loss


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() of ints is stable, but mixing keeps seeds apart)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & 0x7FFFFFFFFFFFFFFF
    return value


def attach_expert_groups(model: nn.Module, backend: str) -> None:
    """Create DeepSpeed's expert / expert-data-parallel groups for MoE layers outside deepspeed.initialize.

    deepspeed.initialize does this for its engine; DDP, export and generation call it themselves.
    """
    layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    if not layers:
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)  # reuses the existing torch.distributed group
    for layer in layers:
        layer.moe.set_deepspeed_parallelism()


def build_moe_ffn(d_model: int, d_ff: int, spec: MoESpec, ep_rank: int, dropout: float) -> MoEFFN:
    return MoEFFN(d_model, d_ff, spec, ep_rank, dropout)
