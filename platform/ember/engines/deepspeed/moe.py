"""Everything DeepSpeed needs from a MoE layer, in one place.

- `build_deepspeed_moe`: DeepSpeed's own MoE layer from the spec (`moe.impl: deepspeed`).
- `expert_parallel_group`: DeepSpeed's expert-parallel / expert-data-parallel groups (deepspeed.utils.groups),
  created once per ep_size; ember's layer exchanges tokens over the same groups ZeRO reduces experts over.
- `expose_to_deepspeed(model)`: DeepSpeed's engine finds MoE layers by isinstance(module, deepspeed.moe.layer.MoE),
  and that decides ZeRO's expert-data-parallel reduction, the per-expert checkpoint files
  (`layer_L_expert_E_*`, keys with global expert ids) and their loading. Each ember layer is re-classed as
  `DeepSpeedEmberMoE`, a subclass of both: ember's methods come first, DeepSpeed's constructor never runs,
  and its state_dict is written in DeepSpeed's per-expert layout (`PER_EXPERT`), which DeepSpeed's saver
  splits into those files. Only the DeepSpeed engine does this: FSDP's distributed checkpoint resolves
  state-dict keys as module attributes, so everywhere else the stacked layout stays.
- `to_per_expert_layout` / `from_per_expert_layout`: either layout loads into either impl (load hooks), so
  checkpoints and exports of one impl load into the other.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ember.models.layers.mlp import MLP
from ember.models.layers.moe.experts import stack_experts, unstack_experts
from ember.spec.model import MoESpec

PER_EXPERT = "deepspeed_moe.experts.deepspeed_experts.{}."  # + fc.weight, fc.bias, proj.weight, proj.bias
DEEPSPEED_GATE = "deepspeed_moe.gate.wg.weight"
EMBER_GATE = "router.gate.weight"
STACKED = ("w_in", "b_in", "w_out", "b_out")  # under "experts."
PER_EXPERT_KEY = re.compile(r"^deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.+)$")


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


def _accept_stacked_layout(layer, state: dict[str, Any], prefix: str, *args) -> None:
    to_per_expert_layout(state, prefix, layer.num_local_experts)


def expert_parallel_group(ep_size: int, use_data_before_expert_parallel: bool = False):
    """DeepSpeed's expert-parallel group for this ep_size (creating its groups on first use)."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(
            ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel
        )
    return groups._get_expert_parallel_group(name)


def expert_groups(ep_size: int) -> tuple[Any, Any]:
    """(expert-parallel group, expert-data-parallel group) of this rank, DeepSpeed's for this ep_size."""
    from deepspeed.utils import groups

    parallel = expert_parallel_group(ep_size)
    return parallel, groups._get_expert_data_parallel_group(f"ep_size_{ep_size}")


def attach_expert_groups(model: nn.Module, backend: str) -> None:
    """Give every MoE layer its expert groups outside deepspeed.initialize (DDP, FSDP, export, generation)."""
    layers = [m for m in model.modules() if hasattr(m, "set_deepspeed_parallelism")]
    if not layers:
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)  # reuses the existing torch.distributed group
    for layer in layers:
        layer.set_deepspeed_parallelism()


def expose_to_deepspeed(model: nn.Module) -> None:
    from ember.models.layers.moe.layer import EmberMoE

    for module in model.modules():
        if type(module) is EmberMoE:
            module.__class__ = deepspeed_ember_moe()


_CLASS: list[type] = []


def deepspeed_ember_moe() -> type:
    """EmberMoE as DeepSpeed's MoE (built on first use: importing deepspeed is slow)."""
    if not _CLASS:
        from deepspeed.moe.layer import MoE

        from ember.models.layers.moe.layer import EmberMoE

        class DeepSpeedEmberMoE(EmberMoE, MoE):
            def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:
                state = nn.Module.state_dict(self, destination=destination, prefix=prefix, keep_vars=keep_vars)
                to_per_expert_layout(state, prefix, self.num_local_experts, keep_vars)
                return state

        DeepSpeedEmberMoE.__module__, DeepSpeedEmberMoE.__qualname__ = __name__, "DeepSpeedEmberMoE"
        _CLASS.append(DeepSpeedEmberMoE)
    return _CLASS[0]


def __getattr__(name: str) -> type:  # lets pickle find the lazily built class by name
    if name == "DeepSpeedEmberMoE":
        return deepspeed_ember_moe()
    raise AttributeError(name)


def to_per_expert_layout(state: dict[str, Any], prefix: str, num_local: int, keep_vars: bool = False) -> None:
    """In place, when `state` holds ember's layout under `prefix`: one entry per local expert and parameter,
    and the gate under DeepSpeed's name."""
    if prefix + EMBER_GATE in state:
        state[prefix + DEEPSPEED_GATE] = state.pop(prefix + EMBER_GATE)
    if prefix + "experts.w_in" not in state:
        return
    stacked = {name: state.pop(f"{prefix}experts.{name}") for name in STACKED}
    for local, tensors in enumerate(unstack_experts(stacked, num_local)):
        for name, tensor in tensors.items():
            # Cloned: a view would drag the whole stacked storage into every saved expert file.
            state[prefix + PER_EXPERT.format(local) + name] = tensor if keep_vars else tensor.clone()


def from_per_expert_layout(state: dict[str, Any], prefix: str, num_local: int) -> None:
    """In place, when `state` holds DeepSpeed's layout under `prefix`: back to ember's stacked layout."""
    if prefix + DEEPSPEED_GATE in state:
        state[prefix + EMBER_GATE] = state.pop(prefix + DEEPSPEED_GATE)
    per_expert: dict[int, dict[str, torch.Tensor]] = {}
    for key in [k for k in state if k.startswith(prefix)]:
        match = PER_EXPERT_KEY.match(key[len(prefix):])
        if match:
            per_expert.setdefault(int(match.group(1)), {})[match.group(2)] = state.pop(key)
    if not per_expert:
        return
    if sorted(per_expert) != list(range(num_local)):
        raise KeyError(f"{prefix}: the state holds experts {sorted(per_expert)}, this layer has {num_local}")
    stacked = stack_experts([per_expert[local] for local in range(num_local)])
    state.update({f"{prefix}experts.{name}": tensor for name, tensor in stacked.items()})
