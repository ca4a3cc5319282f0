"""The Engine interface: what the training loop needs from DeepSpeed, DDP, FSDP2 or fairscale.

The loop calls, per optimizer step: for each micro-batch `forward(...)` then `backward(loss)`, then `step()`.
An engine owns loss scaling for gradient accumulation, clipping, the LR scheduler and checkpoint I/O
of its own state (model, optimizer, scheduler); the checkpoint manager owns everything around it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ember.registry import Registry
from ember.world import World


@runtime_checkable
class Engine(Protocol):
    module: nn.Module  # the unwrapped model (for eval, generation, export)

    def forward(self, *args: Any) -> Any:
        """Run the wrapped model (autocast per the engine's precision)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss; the engine divides by the accumulation steps."""

    def step(self) -> float:
        """Clip, optimizer step, scheduler step, zero grads. Returns the global grad norm before clipping."""

    def lr(self) -> float: ...

    def save(self, folder: Path) -> None:
        """Collective: every rank writes its part of the engine state into `folder`."""

    def load(self, folder: Path) -> None:
        """Collective: restore what `save` wrote (same world size)."""

    @property
    def is_moe_aware(self) -> bool: ...

    # True when `load` accepts a checkpoint saved by another world size (full or resharding formats).
    reshards_on_load: bool


ENGINES: Registry[Engine] = Registry("engine")


def build_engine(spec, model: nn.Module, world: World) -> Engine:
    """spec is the JobSpec; each engine reads its own section plus optim/schedule."""
    # Import for the registration side effect; engines import heavy libraries lazily inside.
    import ember.engines.ddp  # noqa: F401
    import ember.engines.deepspeed  # noqa: F401
    import ember.engines.fairscale  # noqa: F401
    import ember.engines.fsdp  # noqa: F401

    return ENGINES.get(spec.engine.kind)(spec, model, world)


def network_spec(spec, name: str):
    """The job spec one network's engine is built from (a GAN's generator or discriminator): its own
    optim/engine sections, else the job's."""
    network = getattr(spec.model, name)
    return spec.model_copy(update={"optim": network.optim or spec.optim, "engine": network.engine or spec.engine})
