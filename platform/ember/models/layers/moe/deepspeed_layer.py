"""`moe.impl: deepspeed`: DeepSpeed's own MoE layer, built from the spec. The one place in models/ that
touches deepspeed; its process groups are handed to it from outside (engines/deepspeed/moe.py)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ember.models.layers.mlp import MLP
from ember.models.layers.moe.layouts import to_per_expert_layout
from ember.spec.model import MoESpec


def build_deepspeed_moe(d_model: int, d_ff: int, spec: MoESpec, dropout: float) -> nn.Module:
    from deepspeed.moe.layer import MoE  # deferred: importing deepspeed costs ~2 s

    layer = MoE(
        hidden_size=d_model,
        expert=MLP(d_model, d_ff, dropout),
        num_experts=spec.num_experts,
        ep_size=spec.ep_size,
        k=spec.top_k,
        capacity_factor=spec.capacity_factor,
        eval_capacity_factor=spec.eval_capacity_factor,
        min_capacity=spec.min_capacity,
        drop_tokens=spec.drop_tokens,
        use_residual=spec.residual,
        use_rts=False,  # random token selection makes routing depend on RNG state; ember keeps it deterministic
        top2_2nd_expert_sampling=False,  # likewise: the second expert is the second-best, not a Gumbel sample
    )
    layer.register_load_state_dict_pre_hook(_accept_stacked_layout)
    return layer


def local_experts(layer: nn.Module) -> list[nn.Module]:
    """The MLPs of this rank's experts in a DeepSpeed MoE layer, in local order."""
    return list(layer.deepspeed_moe.experts.deepspeed_experts)


def _accept_stacked_layout(layer, state: dict[str, Any], prefix: str, *args) -> None:
    to_per_expert_layout(state, prefix, layer.num_local_experts)
