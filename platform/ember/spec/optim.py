"""Optimizer, learning-rate schedule and step schedule sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ember.spec.base import Section


class OptimSpec(Section):
    name: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (matrices only, not norms/biases).")
    momentum: float = Field(0.9, ge=0, description="SGD momentum.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")


class ScheduleSpec(Section):
    steps: int = Field(100, ge=1, description="Optimizer steps to train for.")
    micro_batch: int = Field(8, ge=1, description="Sequences per rank per forward pass.")
    global_batch: int | None = Field(
        None, ge=1, description="Sequences per optimizer step over all ranks; default micro_batch x data-parallel size."
    )
    eval_every: int = Field(50, ge=1, description="Evaluate held-out loss every N steps (and at the end).")
    eval_batches: int = Field(4, ge=1, description="Micro-batches per rank in one evaluation.")
    seed: int = Field(0, description="Seed for weights and every other random choice.")
