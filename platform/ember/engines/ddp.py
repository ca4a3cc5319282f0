"""PyTorch DistributedDataParallel, and `TorchEngine`: the step logic DDP, FSDP2 and fairscale share.

A TorchEngine owns the plain-torch parts of a step: loss scaling for gradient accumulation, skipping the
gradient sync on all but the last micro-batch, bf16 autocast, clip + optimizer + scheduler, and
rank-0 checkpoint files. Subclasses say how their wrapper skips a sync and how they clip and save.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ember.checkpoint.io import save_file
from ember.engines.base import ENGINES
from ember.engines.expert_groups import attach_expert_groups
from ember.engines.expert_shards import ExpertShards
from ember.engines.optim import build_optimizer, build_scheduler
from ember.world import World


class TorchEngine:
    """Common step logic over a wrapped module; subclasses override the hooks named `_...`."""

    reshards_on_load = True  # rank 0 saves the full model and optimizer state; any world size loads it

    def __init__(
        self,
        spec,
        module: nn.Module,
        wrapped: nn.Module,
        optimizer: torch.optim.Optimizer,
        world: World,
        use_autocast: bool = True,
    ) -> None:
        self.module, self.wrapped, self.optimizer, self.world = module, wrapped, optimizer, world
        self.scheduler = build_scheduler(optimizer, spec.optim, spec.schedule.steps)
        self.accumulation = spec.grad_accumulation
        self.grad_clip = spec.engine.grad_clip
        self.use_autocast = use_autocast and spec.engine.precision == "bf16"
        self.backwards = 0  # micro-batches seen; decides which one carries the gradient sync

    @property
    def is_moe_aware(self) -> bool:
        return False

    @property
    def max_norm(self) -> float:
        return self.grad_clip if self.grad_clip is not None else math.inf  # inf: measure the norm, never clip

    @property
    def syncs_next_backward(self) -> bool:
        """True when the coming backward is the last micro-batch of the optimizer step."""
        return (self.backwards + 1) % self.accumulation == 0

    def forward(self, *args: Any) -> Any:
        autocast = torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=self.use_autocast)
        with autocast, self._forward_context():
            return self.wrapped(*args)

    def backward(self, loss: torch.Tensor) -> None:
        with self._backward_context():
            (loss / self.accumulation).backward()
        self.backwards += 1

    def step(self) -> float:
        norm = self._clip_grad_norm()
        self.optimizer.step()
        self.scheduler.step()
        self.wrapped.zero_grad(set_to_none=True)  # through the wrapper: ShardedDDP keeps bucketed grads as views
        return norm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, folder: Path) -> None:
        model_state, optimizer_state = self._model_state(), self._optimizer_state()
        if self.world.is_main:
            save_file(model_state, folder / "model.pt")
            save_file(optimizer_state, folder / "optimizer.pt")
            save_file(self.scheduler.state_dict(), folder / "scheduler.pt")
        self.world.barrier()

    def load(self, folder: Path) -> None:
        self._load_model_state(read_torch_file(folder / "model.pt", self.world.device))
        self._load_optimizer_state(read_torch_file(folder / "optimizer.pt", self.world.device))
        self.scheduler.load_state_dict(read_torch_file(folder / "scheduler.pt", "cpu"))

    # Hooks: how this wrapper skips a gradient sync, clips, and gathers or shards its model and optimizer state.
    def _model_state(self) -> dict[str, Any]:
        return self.module.state_dict()

    def _load_model_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)

    def _forward_context(self) -> AbstractContextManager:
        return nullcontext()

    def _backward_context(self) -> AbstractContextManager:
        return nullcontext()

    def _clip_grad_norm(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2

    def _optimizer_state(self) -> dict | None:
        """The full optimizer state on rank 0 (collective where the optimizer is sharded)."""
        return self.optimizer.state_dict() if self.world.is_main else None

    def _load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def read_torch_file(path: Path, device: torch.device | str) -> Any:
    return torch.load(path, map_location=device, weights_only=False)


class DDPEngine(TorchEngine):
    experts: ExpertShards | None = None  # expert parallelism: experts DDP leaves alone (engines/expert_shards.py)

    def _forward_context(self) -> AbstractContextManager:
        # DDP decides in forward whether the coming backward reduces gradients.
        return nullcontext() if self.syncs_next_backward else self.wrapped.no_sync()

    def step(self) -> float:
        if self.experts is not None:
            self.experts.reduce_gradients()
        return super().step()

    def _clip_grad_norm(self) -> float:
        if self.experts is None:
            return super()._clip_grad_norm()
        return self.experts.clip_grad_norm(self.module, self.max_norm)

    def _model_state(self) -> dict[str, Any]:
        state = super()._model_state()
        return self.experts.model_state(state) if self.experts is not None else state

    def _load_model_state(self, state: dict[str, Any]) -> None:
        super()._load_model_state(self.experts.load_model_state(state) if self.experts is not None else state)

    def _optimizer_state(self) -> dict | None:
        if self.experts is None:
            return super()._optimizer_state()
        state = self.experts.optimizer_state(self.optimizer)  # collective: every rank gathers
        return state if self.world.is_main else None

    def _load_optimizer_state(self, state: dict) -> None:
        if self.experts is not None:
            state = self.experts.load_optimizer_state(self.optimizer, state)
        super()._load_optimizer_state(state)


@ENGINES.register("ddp")
def build_ddp_engine(spec, model: nn.Module, world: World) -> DDPEngine:
    model.to(world.device)
    attach_expert_groups(model, world)  # MoE layers need their expert groups (size 1 without EP)
    experts = ExpertShards(model, world) if world.ep_size > 1 else None
    if experts is not None:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts.names)
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=device_ids)
    optimizer = build_optimizer(model, spec.optim, fused=world.device.type == "cuda")
    engine = DDPEngine(spec, model, wrapped, optimizer, world)
    engine.experts = experts
    return engine
