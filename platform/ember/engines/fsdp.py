"""PyTorch FSDP2: `fully_shard` on every transformer block, then on the root.

bf16 runs through FSDP's MixedPrecisionPolicy (bf16 parameters in compute, fp32 gradient reduction and
master weights) rather than autocast. Checkpoints are torch.distributed.checkpoint folders: every rank
writes its own shards, and a load reshards onto this world.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

from ember.checkpoint.io import save_file
from ember.engines.base import ENGINES
from ember.engines.ddp import TorchEngine, read_torch_file
from ember.engines.expert_groups import attach_expert_groups
from ember.engines.optim import build_optimizer
from ember.world import World

# torch.distributed.fsdp/checkpoint import DTensor, seconds of start-up: imported where used.


class FSDPEngine(TorchEngine):
    # torch.distributed.checkpoint records every shard's place and reshards onto the loading world.
    reshards_on_load = True

    def _backward_context(self) -> AbstractContextManager:
        # Non-final micro-batches keep unsharded gradients and skip the reduce-scatter.
        self.wrapped.set_requires_gradient_sync(self.syncs_next_backward)
        return nullcontext()

    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.module, self.optimizer)
        if self.world.is_main:
            save_file(self.scheduler.state_dict(), folder / "scheduler.pt")
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))
        self.world.barrier()

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(
            self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        self.scheduler.load_state_dict(read_torch_file(folder / "scheduler.pt", "cpu"))


def shard_model(model: nn.Module, world: World, reshard_after_forward: bool, bf16: bool) -> nn.Module:
    """fully_shard each block (one all-gather per block) and the root (embeddings, head, final norm)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.world_size,))
    if bf16:
        # Blocks hand bf16 activations to each other; only the root casts its output (logits) back to fp32.
        inner = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32)
    else:
        inner = root = MixedPrecisionPolicy()
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=inner)
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=root)


@ENGINES.register("fsdp")
def build_fsdp_engine(spec, model: nn.Module, world: World) -> FSDPEngine:
    model.to(world.device)
    attach_expert_groups(model, world)  # MoE layers need their (size-1) expert groups
    bf16 = spec.engine.precision == "bf16"
    sharded = shard_model(model, world, spec.engine.reshard_after_forward, bf16)
    optimizer = build_optimizer(sharded, spec.optim, fused=world.device.type == "cuda")
    return FSDPEngine(spec, sharded, sharded, optimizer, world, use_autocast=False)
