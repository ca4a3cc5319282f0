"""What DeepSpeed's engine needs from ember's MoE layers, in one place.

- `deepspeed_groups(ep_size)`: DeepSpeed's expert-parallel / expert-data-parallel groups (deepspeed.utils.groups),
  created once per ep_size; ZeRO reduces expert gradients over them, so under DeepSpeed ember's layer
  exchanges tokens over the same groups.
- `expose_to_deepspeed(model)`: DeepSpeed's engine finds MoE layers by isinstance(module, deepspeed.moe.layer.MoE),
  and that decides ZeRO's expert-data-parallel reduction, the per-expert checkpoint files
  (`layer_L_expert_E_*`, keys with global expert ids) and their loading. Each ember layer is re-classed as
  `DeepSpeedEmberMoE`, a subclass of both: ember's methods come first, DeepSpeed's constructor never runs,
  deepspeed.initialize hands it DeepSpeed's expert group (`set_deepspeed_parallelism`), and its state_dict is
  written in DeepSpeed's per-expert layout, which DeepSpeed's saver splits into those files. Only the DeepSpeed
  engine does this: FSDP's distributed checkpoint resolves state-dict keys as module attributes, so everywhere
  else the stacked layout stays.
- `join_deepspeed_groups(model, backend)`: DeepSpeed's own MoE layers (`moe.impl: deepspeed`) outside
  deepspeed.initialize (DDP, FSDP, generation, serving) set up their groups through DeepSpeed's API.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ember.engines.deepspeed.comm import init_deepspeed_comm
from ember.models.layers.moe import EmberMoE
from ember.models.layers.moe.layouts import to_per_expert_layout


def deepspeed_groups(ep_size: int, use_data_before_expert_parallel: bool = False) -> tuple[Any, Any]:
    """(expert-parallel group, expert-data-parallel group) of this rank, DeepSpeed's for this ep_size (creating
    its groups on first use)."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(
            ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel
        )
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def join_deepspeed_groups(model: nn.Module, backend: str) -> None:
    """DeepSpeed's own MoE layers in `model` join their DeepSpeed expert groups (no-op without any)."""
    layers = [m for m in model.modules() if hasattr(m, "set_deepspeed_parallelism")]
    if not layers:
        return
    init_deepspeed_comm(backend)  # reuses the existing torch.distributed group
    for layer in layers:
        layer.set_deepspeed_parallelism()


def expose_to_deepspeed(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is EmberMoE:
            module.__class__ = deepspeed_ember_moe()


@functools.cache
def deepspeed_ember_moe() -> type:
    """EmberMoE as DeepSpeed's MoE (built on first use: importing deepspeed is slow)."""
    from deepspeed.moe.layer import MoE

    class DeepSpeedEmberMoE(EmberMoE, MoE):
        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """Called by deepspeed.initialize: exchange tokens over DeepSpeed's expert-parallel group."""
            self.use_expert_group(deepspeed_groups(self.ep_size, use_data_before_expert_parallel_)[0])

        def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:
            state = nn.Module.state_dict(self, destination=destination, prefix=prefix, keep_vars=keep_vars)
            to_per_expert_layout(state, prefix, self.num_local_experts, keep_vars)
            return state

    DeepSpeedEmberMoE.__module__, DeepSpeedEmberMoE.__qualname__ = __name__, "DeepSpeedEmberMoE"
    return DeepSpeedEmberMoE


def __getattr__(name: str) -> type:  # lets pickle find the lazily built class by name
    if name == "DeepSpeedEmberMoE":
        return deepspeed_ember_moe()
    raise AttributeError(name)
