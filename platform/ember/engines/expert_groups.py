"""Every MoE layer of a model gets its expert-parallel group from here (outside deepspeed.initialize, which
hands DeepSpeed's groups itself): ember's layers the World's, DeepSpeed's own layers DeepSpeed's."""

from __future__ import annotations

from torch import nn

from ember.models.layers.moe import EmberMoE
from ember.world import World


def attach_expert_groups(model: nn.Module, world: World) -> None:
    """Collective when the model has expert parallelism (every rank creates the groups)."""
    for layer in [m for m in model.modules() if isinstance(m, EmberMoE)]:
        if layer.ep_size not in (1, world.ep_size):
            raise ValueError(f"a MoE layer with ep_size={layer.ep_size} in a world with ep_size={world.ep_size}")
        layer.use_expert_group(world.expert_groups[0] if layer.ep_size > 1 else None)
    if any(hasattr(m, "set_deepspeed_parallelism") and not isinstance(m, EmberMoE) for m in model.modules()):
        from ember.engines.deepspeed.moe import join_deepspeed_groups

        join_deepspeed_groups(model, world.backend)
