"""Exponential moving average of a model's weights: the copy diffusion and GAN sample from.

Every rank keeps the same copy (it averages weights that are identical on every rank after the step), so
rank 0 alone saves it. Float buffers (BatchNorm running statistics) are averaged too, so the EMA model
runs in eval mode with statistics that match its weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, start_step: int = 0) -> None:
        self.decay, self.start_step = decay, start_step
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """After an optimizer step; before `start_step` the copy just follows the weights."""
        self.updates += 1
        weight = 1.0 - self.decay if self.updates > self.start_step else 1.0
        for mine, theirs in zip(self._state(self.module), self._state(model), strict=True):
            if mine.is_floating_point():
                mine.lerp_(theirs.detach().to(mine.dtype), weight)
            else:
                mine.copy_(theirs)

    @staticmethod
    def _state(model: nn.Module) -> list[torch.Tensor]:
        return [*model.parameters(), *model.buffers()]

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
