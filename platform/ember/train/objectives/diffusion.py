"""Denoising diffusion: noise schedules, the training loss (eps or v prediction, label dropout for
classifier-free guidance) and the samplers (DDPM ancestral, DDIM with n steps), all pure functions of a
`NoiseSchedule` and a network `model(x_t, t, labels)`.

Notation follows DDPM: alpha_bar(t) is the share of signal variance left at step t, x_t =
sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps; v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.data.formats import ImageBatch
from ember.engines import build_engine
from ember.models import build_denoiser
from ember.models.layers.moe.deepspeed_compat import attach_expert_groups
from ember.models.layers.moe.router import update_balance_biases
from ember.spec.generative import DiffusionSpec
from ember.train.ema import EMA
from ember.train.objectives.base import ModelParts, NextBatch, Sample, class_grid
from ember.world import World

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class NoiseSchedule:
    alpha_bar: torch.Tensor  # float64 [T]
    prediction: str  # eps | v

    @property
    def timesteps(self) -> int:
        return len(self.alpha_bar)

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t), shaped to broadcast over images like `like`."""
        a = self.alpha_bar.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def to_eps_and_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """The network's output (eps or v) as the (eps, x0) pair the samplers step with."""
        signal, noise = self.coefficients(t, x_t)
        if self.prediction == "eps":
            eps = output
            x0 = (x_t - noise * eps) / signal
        else:
            x0 = signal * x_t - noise * output
            eps = noise * x_t + signal * output
        return eps, x0


def build_schedule(spec: DiffusionSpec) -> NoiseSchedule:
    steps = spec.timesteps
    if spec.schedule == "linear":
        # DDPM's betas 1e-4 .. 0.02 for T=1000, rescaled so other T cover the same noise range.
        betas = torch.linspace(1e-4 * 1000 / steps, 0.02 * 1000 / steps, steps, dtype=torch.float64)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
    else:
        # Nichol & Dhariwal's cosine schedule, betas clipped at 0.999.
        s = 0.008
        f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
    return NoiseSchedule(alpha_bar, spec.prediction)


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


def guided(model: Denoiser, labels: torch.Tensor | None, null_label: int, scale: float):
    """Classifier-free guidance: out = uncond + scale * (cond - uncond); scale 1 is the plain conditional
    model and needs one forward, any other scale runs conditional and unconditional in one batch."""
    if labels is None or scale == 1.0:
        return lambda x, t: model(x, t, labels)

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_label)]))
        cond, uncond = both.chunk(2)
        return uncond + scale * (cond - uncond)

    return forward


@torch.no_grad()
def sample_images(
    model: Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    labels: torch.Tensor | None,
    *,
    null_label: int,
    guidance: float = 1.0,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Images in [-1, 1] from pure noise; a CPU generator seeded by `seed` makes them reproducible."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(device)
    forward = guided(model, labels, null_label, guidance)
    if sampler == "ddpm":
        return ddpm_loop(forward, schedule, x, generator)
    return ddim_loop(forward, schedule, x, steps)


def ddim_loop(forward, schedule: NoiseSchedule, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) over `steps` evenly spaced timesteps, T-1 down to 0."""
    times = torch.linspace(schedule.timesteps - 1, 0, steps).round().long().tolist()
    for index, step in enumerate(times):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        _, x0 = schedule.to_eps_and_x0(forward(x, t).float(), x, t)
        x0 = x0.clamp(-1, 1)
        if index == len(times) - 1:
            return x0
        signal, noise = schedule.coefficients(t, x)
        eps = (x - signal * x0) / noise  # the noise that the clamped x0 implies
        signal, noise = schedule.coefficients(torch.full_like(t, times[index + 1]), x)
        x = signal * x0 + noise * eps
    return x


def ddpm_loop(forward, schedule: NoiseSchedule, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Ancestral sampling with the posterior q(x_{t-1} | x_t, x0) over all T steps."""
    alpha_bar = schedule.alpha_bar
    for step in range(schedule.timesteps - 1, -1, -1):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        _, x0 = schedule.to_eps_and_x0(forward(x, t).float(), x, t)
        x0 = x0.clamp(-1, 1)
        if step == 0:
            return x0
        a_t, a_prev = alpha_bar[step].item(), alpha_bar[step - 1].item()
        beta = 1 - a_t / a_prev
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
        variance = beta * (1 - a_prev) / (1 - a_t)
        x = mean + math.sqrt(variance) * torch.randn(x.shape, generator=generator).to(x.device)
    return x


class DiffusionObjective:
    """One denoiser, one engine, an EMA copy; samples come from the EMA copy (what `ember eval` scores)."""

    throughput_name = "images_per_s"
    loss_unit = "(EMA denoiser MSE)"

    def __init__(self, spec, world: World) -> None:
        self.spec, self.world, self.model_spec = spec, world, spec.model
        model = build_denoiser(spec.model, world.ep_rank, spec.schedule.seed).to(world.device)
        self.ema = EMA(model, spec.model.ema.decay, spec.model.ema.start_step)
        self.engine = build_engine(spec, model, world)
        if world.ep_size > 1:  # the EMA copy's MoE blocks exchange tokens with the other EP ranks' copies
            attach_expert_groups(self.ema.module, world.backend)
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
