"""Optimizer and learning-rate schedule from the spec; shared by every engine."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ember.models.layers.moe import is_expert_parameter
from ember.spec.optim import OptimSpec


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; expert parameters get their own groups (DeepSpeed reduces them per EP group)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        groups.setdefault((param.dim() >= 2, is_expert_parameter(param)), []).append(param)
    result = []
    for (decay, expert), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0, "name": f"decay{int(decay)}"}
        if expert:
            # The keys DeepSpeed's split_params_into_different_moe_groups_for_optimizer would write.
            group.update(moe=True, name=f"{group['name']}_experts")
        result.append(group)
    return result


def build_optimizer(model: nn.Module, spec: OptimSpec, fused: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, spec.weight_decay)
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    cls = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    kwargs = {"fused": True} if fused else {"foreach": False}  # foreach=False: same arithmetic on every engine
    return cls(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, **kwargs)


def lr_multiplier(spec: OptimSpec, total_steps: int) -> Callable[[int], float]:
    """Linear warmup then cosine/linear decay to min_lr_ratio; a pure function of the step."""

    def multiplier(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if spec.schedule == "cosine" else 1 - progress
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * shape

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, spec: OptimSpec, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(spec, total_steps))
