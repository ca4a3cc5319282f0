"""Denoising diffusion training: the loss (eps or v prediction, label dropout for classifier-free guidance)
and the objective; the schedule and samplers live in ember.generation.diffusion (serving and eval use them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.data.formats import ImageBatch
from ember.engines import build_engine
from ember.engines.expert_groups import attach_expert_groups
from ember.generation.diffusion import Denoiser, NoiseSchedule, build_schedule, sample_images
from ember.models import build_denoiser
from ember.models.layers.moe.router import update_balance_biases
from ember.train.ema import EMA
from ember.train.objectives.base import ModelParts, NextBatch, Sample, class_grid
from ember.world import ExpertPlacement, World


def drop_labels(labels: torch.Tensor, num_classes: int, rate: float, generator: torch.Generator | None = None):
    """Replace a share `rate` of labels (and every unlabelled -1) by the 'no class' index num_classes."""
    labels = torch.where(labels < 0, torch.full_like(labels, num_classes), labels)
    if rate > 0:
        drop = torch.rand(labels.shape, generator=generator, device="cpu").to(labels.device) < rate
        labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    return labels


def diffusion_loss(model: Denoiser, schedule: NoiseSchedule, x0: torch.Tensor, labels: torch.Tensor | None):
    """MSE between the network's output and its target (eps or v) at a uniformly drawn timestep.

    Noise and timesteps come from torch's global RNG, which the checkpoint saves per rank: resume is exact.
    """
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],)).to(x0.device)
    eps = torch.randn(x0.shape).to(x0.device)
    signal, noise = schedule.coefficients(t, x0)
    x_t = signal * x0 + noise * eps
    target = eps if schedule.prediction == "eps" else signal * eps - noise * x0
    return F.mse_loss(model(x_t, t, labels).float(), target)


class DiffusionObjective:
    """One denoiser, one engine, an EMA copy; samples come from the EMA copy (what `ember eval` scores)."""

    throughput_name = "images_per_s"
    loss_unit = "(EMA denoiser MSE)"

    def __init__(self, spec, world: World, placement: ExpertPlacement | None = None) -> None:
        self.spec, self.world, self.model_spec = spec, world, spec.model
        placement = placement or world.expert_placement(spec.model)
        model = build_denoiser(spec.model, placement, spec.schedule.seed).to(world.device)
        self.ema = EMA(model, spec.model.ema.decay, spec.model.ema.start_step)
        self.engine = build_engine(spec, model, world)
        if world.ep_size > 1:  # the EMA copy's MoE blocks exchange tokens with the other EP ranks' copies
            attach_expert_groups(self.ema.module, world)
        self.engines = {"model": self.engine}
        self.parts = ModelParts(self.engines, {"model": self.ema}, world)
        self.schedule = build_schedule(spec.model)
        self.items_per_step = spec.global_batch

    def labels_of(self, batch: ImageBatch, rate: float) -> torch.Tensor | None:
        if not self.model_spec.num_classes:
            return None
        return drop_labels(batch.labels, self.model_spec.num_classes, rate)

    def train_step(self, next_batch: NextBatch, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        total = torch.zeros((), dtype=torch.float64, device=self.world.device)
        aux_total = torch.zeros((), dtype=torch.float64, device=self.world.device)
        moe = self.model_spec.moe
        for _ in range(self.spec.grad_accumulation):
            batch = next_batch().to(self.world.device, non_blocking=True)
            labels = self.labels_of(batch, self.model_spec.label_dropout)
            loss = diffusion_loss(self.engine.forward, self.schedule, batch.images, labels)
            objective = loss
            if moe is not None:  # the DiT's MoE blocks left their load-balancing loss on the module
                aux = self.engine.module.aux_loss
                objective = loss + moe.aux_loss_weight * aux
                aux_total += aux.detach().double()
            self.engine.backward(objective)
            total += loss.detach().double()
        grad_norm = self.engine.step()
        update_balance_biases(self.engine.module)  # moe.balance: bias, as the LM does
        self.ema.update(self.engine.module)
        means = {"loss": total / self.spec.grad_accumulation}
        if moe is not None:
            means["aux_loss"] = aux_total / self.spec.grad_accumulation
        return means, {"grad_norm": float(grad_norm), "lr": self.engine.lr()}

    @torch.no_grad()
    def eval_loss(self, next_batch: NextBatch, batches: int) -> torch.Tensor:
        """EMA model's loss on held-out images, with noise fixed by a seed (comparable across steps)."""
        total = torch.zeros(1, dtype=torch.float64, device=self.world.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.schedule.seed)
            for _ in range(batches):
                batch = next_batch().to(self.world.device)
                total += diffusion_loss(self.ema.module, self.schedule, batch.images, self.labels_of(batch, 0.0))
        return total / batches

    def generate(self, labels: torch.Tensor | None, count: int, seed: int, guidance: float | None = None,
                 steps: int | None = None) -> torch.Tensor:
        """`count` images in [-1, 1] from the EMA model (labels: one per image, or None)."""
        spec = self.model_spec
        return sample_images(
            self.ema.module, self.schedule, (count, spec.channels, spec.image_size, spec.image_size),
            None if labels is None else labels.to(self.world.device), null_label=spec.num_classes,
            guidance=spec.guidance if guidance is None else guidance, sampler=spec.sampler,
            steps=steps or spec.sample_steps, seed=seed, device=self.world.device,
        )

    def sample(self, seed: int) -> Sample | None:
        return class_grid(self.generate, self.model_spec.num_classes, self.spec.logging.sample_rows, seed)
