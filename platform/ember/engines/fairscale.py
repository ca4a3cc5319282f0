"""fairscale: `sharded_ddp` (OSS optimizer-state sharding + ShardedDataParallel) or `fsdp` (CUDA only).

OSS gives each rank the optimizer state of a slice of the parameters (ZeRO-1 in torch); ShardedDDP reduces
each gradient only to the rank that owns its slice. sharded_ddp checkpoints hold the consolidated
(unsharded) optimizer state, so they load like DDP's.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from torch import nn

from ember.checkpoint.io import save_file
from ember.engines.base import ENGINES
from ember.engines.ddp import TorchEngine, read_torch_file
from ember.engines.expert_groups import attach_expert_groups
from ember.engines.optim import build_optimizer
from ember.errors import UserError
from ember.world import World


class ShardedDDPEngine(TorchEngine):
    def _backward_context(self) -> AbstractContextManager:
        # ShardedDDP's gradient hooks read the no_sync flag during backward.
        return nullcontext() if self.syncs_next_backward else self.wrapped.no_sync()

    def _clip_grad_norm(self) -> float:
        return float(self.optimizer.clip_grad_norm(self.max_norm))  # OSS: each rank's shard, one all-reduce

    def _optimizer_state(self) -> dict | None:
        self.optimizer.consolidate_state_dict(recipient_rank=0)
        return self.optimizer.state_dict() if self.world.is_main else None


class FairscaleFSDPEngine(ShardedDDPEngine):
    """module is the FSDP wrapper itself: the inner model holds parameter shards and cannot run alone.

    Each rank saves its own optimizer shard (fairscale's gather_full_optim_state_dict allows one
    parameter group only, and ember has decay / no-decay groups); the weights are saved unsharded.
    """

    reshards_on_load = False  # the optimizer shards are cut for the saving world size

    def _clip_grad_norm(self) -> float:
        return float(self.wrapped.clip_grad_norm_(self.max_norm))

    def save(self, folder: Path) -> None:
        model_state = self.wrapped.state_dict()  # collective: the full, unsharded weights
        save_file(self.optimizer.state_dict(), folder / f"optimizer.rank{self.world.rank:05d}.pt")
        if self.world.is_main:
            save_file(model_state, folder / "model.pt")
            save_file(self.scheduler.state_dict(), folder / "scheduler.pt")
        self.world.barrier()

    def load(self, folder: Path) -> None:
        self.wrapped.load_state_dict(read_torch_file(folder / "model.pt", "cpu"))
        shard = folder / f"optimizer.rank{self.world.rank:05d}.pt"
        self.optimizer.load_state_dict(read_torch_file(shard, self.world.device))
        self.scheduler.load_state_dict(read_torch_file(folder / "scheduler.pt", "cpu"))


def build_oss(model: nn.Module, spec, fused: bool):
    """An OSS optimizer with exactly the class, groups and settings `build_optimizer` would choose."""
    from fairscale.optim.oss import OSS

    template = build_optimizer(model, spec.optim, fused=fused)
    cls = type(template)
    accepted = inspect.signature(cls.__init__).parameters
    settings = {key: value for key, value in template.defaults.items() if key in accepted}
    return OSS(template.param_groups, optim=cls, **settings)


def build_sharded_ddp(spec, model: nn.Module, world: World) -> ShardedDDPEngine:
    from fairscale.nn.data_parallel import ShardedDataParallel

    attach_expert_groups(model, world)  # MoE layers need their (size-1) expert groups
    optimizer = build_oss(model, spec, fused=world.device.type == "cuda")
    wrapped = ShardedDataParallel(model, optimizer)
    return ShardedDDPEngine(spec, model, wrapped, optimizer, world)


def build_fairscale_fsdp(spec, model: nn.Module, world: World) -> FairscaleFSDPEngine:
    if world.device.type != "cuda":
        raise UserError(
            "engine.mode=fsdp: fairscale's FullyShardedDataParallel asserts CUDA and this worker has no GPU; "
            "use engine.mode=sharded_ddp or engine.kind=fsdp on CPU"
        )
    from fairscale.nn import FullyShardedDataParallel

    attach_expert_groups(model, world)
    # Groups come from the unwrapped model (shards are 1-D, so FSDP's view would lose decay vs no-decay);
    # without flattening FSDP shards these same Parameter objects in place.
    optimizer = build_optimizer(model, spec.optim, fused=True)
    wrapped = FullyShardedDataParallel(model, flatten_parameters=False)
    return FairscaleFSDPEngine(spec, wrapped, wrapped, optimizer, world)


@ENGINES.register("fairscale")
def build_fairscale_engine(spec, model: nn.Module, world: World) -> TorchEngine:
    model.to(world.device)
    if spec.engine.mode == "fsdp":
        return build_fairscale_fsdp(spec, model, world)
    return build_sharded_ddp(spec, model, world)
