"""MoE FFN layers: ember's own (router -> dispatcher -> grouped experts) or DeepSpeed's, picked by `moe.impl`.

Every expert is initialised from a generator seeded by its *global* expert id, so a model built with
ep_size=2 holds exactly the experts a model built with ep_size=1 holds, split in two, and both impls
build the same function from the same seed (DeepSpeed would otherwise deep-copy one expert into every
slot). Expert parameters carry DeepSpeed's markers (allreduce=False, group_name), so ZeRO reduces them
over the expert-data-parallel group and the optimizer's expert groups hold them, whichever impl.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.layers.mlp import MLP
from ember.models.layers.moe.deepspeed_layer import build_deepspeed_moe, local_experts
from ember.models.layers.moe.dispatch import TokenDispatcher
from ember.models.layers.moe.experts import GroupedExperts
from ember.models.layers.moe.layouts import from_per_expert_layout
from ember.models.layers.moe.router import TopKRouter
from ember.spec.model import MoESpec
from ember.world import ExpertPlacement

InitFn = Callable[[nn.Module, torch.Generator], None]


def is_expert_parameter(param: nn.Parameter) -> bool:
    """DeepSpeed marks expert parameters with allreduce=False (they reduce over expert-data-parallel groups)."""
    return not getattr(param, "allreduce", True)


class EmberMoE(nn.Module):
    """Top-k routed experts; forward(x [..., d]) -> (y [..., d], aux loss). `last_stats` after each forward."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        spec: MoESpec,
        placement: ExpertPlacement | None = None,
        dropout: float = 0.0,
        mlp: str = "gelu",
        bias: bool = True,
    ) -> None:
        nn.Module.__init__(self)  # not super(): DeepSpeed's MoE follows in DeepSpeedEmberMoE's MRO
        self.placement = layer_placement(spec, placement)
        self.num_experts, self.ep_size = spec.num_experts, spec.ep_size
        self.num_local_experts = self.placement.num_local
        self.expert_group_name = f"ep_size_{spec.ep_size}"  # DeepSpeed's group name; ZeRO looks groups up by it
        self.router = TopKRouter(
            d_model, spec.num_experts, spec.top_k, spec.capacity_factor, spec.eval_capacity_factor,
            spec.min_capacity, spec.drop_tokens, spec.noisy_gating, spec.routing == "expert_choice",
            spec.scoring, spec.norm_topk_prob, spec.balance, spec.bias_update_rate,
        )
        self.expert_kind, self.expert_has_bias = mlp, bias
        self.experts = GroupedExperts(
            self.num_local_experts, d_model, d_ff, self.expert_group_name, gated=mlp == "swiglu", bias=bias
        )
        self.dispatcher = TokenDispatcher(self.placement)
        self.dropout = dropout
        # The objective weighs the aux term by aux_loss_weight; folding z in at this ratio gives it z_loss_weight.
        self.z_ratio = spec.z_loss_weight / spec.aux_loss_weight if spec.z_loss_weight else 0.0
        if spec.residual:  # Residual-MoE: the names DeepSpeed's MoE(use_residual=True) gives them
            self.mlp = MLP(d_model, d_ff, dropout)
            self.coefficient = nn.Linear(d_model, 2)
        if spec.shared_experts:  # N always-on experts as one FFN N times as wide (the same function)
            self.shared = MLP(d_model, spec.shared_experts * d_ff, dropout, mlp, bias)
            self.shared_gate = nn.Linear(d_model, 1, bias=False) if spec.shared_expert_gate else None
        self.register_load_state_dict_pre_hook(_accept_per_expert_layout)

    @property
    def last_stats(self) -> dict[str, torch.Tensor]:
        return self.router.last_stats

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        routing = self.router(tokens)
        out = self.dispatcher(tokens, routing, self._run_experts)
        if hasattr(self, "mlp"):
            mix = F.softmax(self.coefficient(tokens), dim=-1)
            out = out * mix[:, 0:1] + self.mlp(tokens) * mix[:, 1:]
        if hasattr(self, "shared"):
            shared = self.shared(tokens)
            out = out + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(tokens)) * shared)
        aux = routing.balance_loss + self.z_ratio * routing.z_loss if self.z_ratio else routing.balance_loss
        return out.view(x.shape), aux

    def _run_experts(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return F.dropout(self.experts(rows, counts), self.dropout, self.training)

    def use_expert_group(self, group) -> None:
        """Handed by the engine or the World: the expert-parallel process group tokens are exchanged over."""
        self.dispatcher.group = group if self.ep_size > 1 else None

    def init_experts(self, seed: int, layer: int, init_fn: InitFn) -> None:
        for local, expert_id in enumerate(self.placement.local_experts):
            expert = MLP(self.experts.d_model, self.experts.d_ff, kind=self.expert_kind, bias=self.expert_has_bias)
            init_fn(expert, torch.Generator().manual_seed(hash_seed(seed, layer, expert_id)))
            self.experts.load_expert(local, expert.fc, expert.proj, getattr(expert, "gate", None))


def _accept_per_expert_layout(module: EmberMoE, state, prefix, *args) -> None:
    from_per_expert_layout(state, prefix, module.num_local_experts)


class MoEFFN(nn.Module):
    """The GPT's MoE feed-forward block: forward(x) -> (y, aux loss), whichever impl is inside."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        spec: MoESpec,
        placement: ExpertPlacement | None = None,
        dropout: float = 0.0,
        mlp: str = "gelu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.impl = spec.impl
        self.placement = layer_placement(spec, placement)
        if spec.impl == "ember":
            self.moe = EmberMoE(d_model, d_ff, spec, self.placement, dropout, mlp, bias)
        else:
            self.moe = build_deepspeed_moe(d_model, d_ff, spec, dropout)

    @property
    def last_stats(self) -> dict[str, torch.Tensor]:
        return self.moe.last_stats if self.impl == "ember" else {}

    def init_experts(self, seed: int, layer: int, init_fn: InitFn) -> None:
        if self.impl == "ember":
            self.moe.init_experts(seed, layer, init_fn)
            return
        for expert, expert_id in zip(local_experts(self.moe), self.placement.local_experts, strict=True):
            init_fn(expert, torch.Generator().manual_seed(hash_seed(seed, layer, expert_id)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, aux_loss, *_ = self.moe(x)
        return out, aux_loss


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() of ints is stable, but mixing keeps seeds apart)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & 0x7FFFFFFFFFFFFFFF
    return value


def layer_placement(spec: MoESpec, placement: ExpertPlacement | None) -> ExpertPlacement:
    """The model's placement for this layer's expert count (PR-MoE); None: EP rank 0 of the spec's ep_size."""
    if placement is None:
        return ExpertPlacement(spec.num_experts, spec.ep_size)
    if placement.ep_size != spec.ep_size:
        raise ValueError(f"an ExpertPlacement over ep_size={placement.ep_size} for a layer with ep_size={spec.ep_size}")
    return placement.for_experts(spec.num_experts)


def build_moe_ffn(
    d_model: int,
    d_ff: int,
    spec: MoESpec,
    placement: ExpertPlacement | None,
    dropout: float,
    mlp: str = "gelu",
    bias: bool = True,
) -> MoEFFN:
    """mlp and bias: the experts' kind (gelu or swiglu) and whether they have biases, as the model's FFNs."""
    return MoEFFN(d_model, d_ff, spec, placement, dropout, mlp, bias)
