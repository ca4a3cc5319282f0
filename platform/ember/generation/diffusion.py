"""Diffusion sampling: noise schedules and the samplers (DDPM ancestral, DDIM with n steps, classifier-free
guidance), all pure functions of a `NoiseSchedule` and a network `model(x_t, t, labels)` (a `Denoiser`).

Notation follows DDPM: alpha_bar(t) is the share of signal variance left at step t, x_t =
sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps; v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ember.spec.generative import DiffusionSpec

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
