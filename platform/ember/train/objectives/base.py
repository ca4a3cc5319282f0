"""What the one training loop needs from a model family, and the checkpoint part every family shares.

An `Objective` owns its models, their engines (one per trained network: a GAN has two) and their EMA
copies; the Trainer owns World, data, the checkpoint manager, logging and the step count. So the loop
stays one loop and a family is one file in this folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ember.checkpoint.io import save_file
from ember.engines import Engine
from ember.observe.images import image_grid
from ember.train.ema import EMA
from ember.world import ExpertPlacement, World

NextBatch = Callable[[], Any]


@dataclass
class Sample:
    """What a family shows of itself: text, or an image grid (uint8 [H, W, C])."""

    text: str | None = None
    grid: np.ndarray | None = None


def class_grid(
    generate: Callable[[torch.Tensor | None, int, int], torch.Tensor], num_classes: int, rows: int, seed: int
) -> Sample | None:
    """`rows` samples of every class, one column per class (one column of unconditional samples without
    classes), from `generate(labels, count, seed)` of an image family."""
    if rows == 0:
        return None
    columns = max(1, num_classes)
    labels = torch.arange(columns).repeat(rows) if num_classes else None
    return Sample(grid=image_grid(generate(labels, rows * columns, seed), columns=columns))


class Objective(Protocol):
    engines: dict[str, Engine]
    parts: ModelParts
    items_per_step: int  # tokens (text) or images per optimizer step, for the throughput line
    throughput_name: str  # "tokens_per_s" | "images_per_s"
    loss_unit: str  # how the console names the held-out loss

    def train_step(self, next_batch: NextBatch, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Optimizer step `step` (0-based) of every engine. Returns (per-rank means to average over ranks,
        host floats such as the grad norm and learning rate)."""

    def eval_loss(self, next_batch: NextBatch, batches: int) -> torch.Tensor:
        """Mean held-out loss of this rank (a 1-element float64 tensor)."""

    def sample(self, seed: int) -> Sample | None:
        """What to show in TensorBoard and the console; None when the spec asks for nothing."""


class ModelParts:
    """A checkpoint's engine/ folder: one engine at the top (the layout `ember ckpt export` reads) or one
    subfolder per engine, plus `ema.pt` with every EMA copy, written by rank 0. An EMA copy's weights are the
    same on every rank, except under expert parallelism, where each EP rank averages only its own experts:
    those are all-gathered into ep_size 1 layout for the file (so eval, serving and a resume on any EP size
    read it) and each rank takes its slice back on load. BatchNorm statistics are rank 0's, as DDP keeps
    them (DeepSpeed leaves each rank its own)."""

    def __init__(self, engines: dict[str, Engine], emas: dict[str, EMA], world: World) -> None:
        self.engines, self.emas, self.world = engines, emas, world
        self.expert_shards = {}
        if world.ep_size > 1:
            from ember.engines.expert_shards import ExpertShards
            from ember.models.layers.moe import is_expert_parameter

            for name in emas:
                module = engines[name].module
                if any(is_expert_parameter(p) for p in module.parameters()):
                    self.expert_shards[name] = ExpertShards(module, world)  # names match the EMA copy's state

    @property
    def nested(self) -> bool:
        return len(self.engines) > 1

    @property
    def reshards_on_load(self) -> bool:
        return all(engine.reshards_on_load for engine in self.engines.values())

    def reshard_refusal(self) -> str:
        """The engines' own reasons for not resharding, where they give one."""
        reasons = (getattr(engine, "reshard_refusal", None) for engine in self.engines.values())
        return "; ".join(reason for reason in reasons if reason)

    def folder_of(self, root: Path, name: str) -> Path:
        return root / name if self.nested else root

    def save(self, folder: Path) -> None:
        """Collective, like Engine.save."""
        for name, engine in self.engines.items():
            target = self.folder_of(folder, name)
            target.mkdir(parents=True, exist_ok=True)
            engine.save(target)
        states = {name: ema.state_dict() for name, ema in self.emas.items()}
        for name, shards in self.expert_shards.items():  # collective over each EP group
            states[name]["module"] = shards.model_state(states[name]["module"])
        if self.emas and self.world.is_main:
            save_file(states, folder / "ema.pt")
        self.world.barrier()

    def load(self, folder: Path) -> None:
        for name, engine in self.engines.items():
            engine.load(self.folder_of(folder, name))
        if self.emas:
            saved = torch.load(folder / "ema.pt", map_location=self.world.device, weights_only=False)
            for name, ema in self.emas.items():
                state = saved[name]
                if name in self.expert_shards:
                    state = {**state, "module": self.expert_shards[name].load_model_state(state["module"])}
                ema.load_state_dict(state)


def build_objective(spec, world: World, placement: ExpertPlacement | None = None) -> Objective:
    """The family's objective, with its models built and wrapped in engines; placement: this rank's experts
    (None: World.expert_placement without hosts)."""
    family = spec.model.family
    if family == "diffusion":
        from ember.train.objectives.diffusion import DiffusionObjective

        return DiffusionObjective(spec, world, placement)
    if family == "gan":
        from ember.train.objectives.gan import GANObjective

        return GANObjective(spec, world)
    from ember.train.objectives.lm import LanguageModelObjective

    return LanguageModelObjective(spec, world, placement)
