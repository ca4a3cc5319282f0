"""GAN: non-saturating loss, R1 penalty with lazy regularisation, EMA of the generator.

Two networks, two engines (each with its own optimizer, LR schedule and engine settings), one step:
first D on real vs detached fakes (+ R1 every `r1_interval` steps, scaled by the interval, as StyleGAN2
does, in the same backward), then G through a frozen D. D's weights are frozen during G's step by
`requires_grad_(False)` on the unwrapped module, so G's backward leaves no gradient in D that D's engine
would then reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.data.formats import ImageBatch
from ember.engines import Engine, build_engine, network_spec
from ember.generation.gan import latents, sample_gan
from ember.models import build_gan
from ember.train.ema import EMA
from ember.train.objectives.base import ModelParts, NextBatch, Sample, class_grid
from ember.world import World


def discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """-log D(real) - log(1 - D(fake)) in logits: softplus(-real) + softplus(fake)."""
    return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()


def generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """Non-saturating: -log D(G(z)), strong gradients early when D rejects the fakes."""
    return F.softplus(-fake_scores).mean()


def r1_penalty(real_scores: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """Mean squared norm of D's gradient at real images (Mescheder et al.); a graph to differentiate again."""
    (grad,) = torch.autograd.grad(real_scores.sum(), real_images, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


class GANObjective:
    throughput_name = "images_per_s"
    loss_unit = "(D loss, reals vs EMA-G fakes)"

    def __init__(self, spec, world: World) -> None:
        self.spec, self.world, self.model_spec = spec, world, spec.model
        generator, discriminator = build_gan(spec.model)
        generator, discriminator = generator.to(world.device), discriminator.to(world.device)
        self.ema = EMA(generator, spec.model.ema.decay, spec.model.ema.start_step)
        self.g: Engine = build_engine(network_spec(spec, "generator"), generator, world)
        self.d: Engine = build_engine(network_spec(spec, "discriminator"), discriminator, world)
        self.engines = {"generator": self.g, "discriminator": self.d}
        self.parts = ModelParts(self.engines, {"generator": self.ema}, world)
        self.items_per_step = spec.global_batch

    def latents(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return latents(count, self.model_spec.generator.z_dim, generator, self.world.device)

    def labels_of(self, batch: ImageBatch) -> torch.Tensor | None:
        return batch.labels.clamp(min=0) if self.model_spec.num_classes else None

    def train_step(self, next_batch: NextBatch, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        accumulation = self.spec.grad_accumulation
        regularise = self.model_spec.r1_gamma > 0 and step % self.model_spec.r1_interval == 0
        totals = torch.zeros(3, dtype=torch.float64, device=self.world.device)
        seen = []
        for _ in range(accumulation):
            batch = next_batch().to(self.world.device, non_blocking=True)
            labels = self.labels_of(batch)
            seen.append((len(batch), labels))
            d_loss, r1 = self.discriminator_loss(batch.images, labels, regularise)
            self.d.backward(d_loss)
            totals[:2] += torch.stack([d_loss.detach(), r1.detach()]).double()
        d_norm = self.d.step()
        self.d.module.requires_grad_(False)
        for count, labels in seen:  # G gets the same class mix the data had
            fakes = self.g.forward(self.latents(count), labels)
            g_loss = generator_loss(self.d.module(fakes, labels))
            self.g.backward(g_loss)
            totals[2] += g_loss.detach().double()
        self.d.module.requires_grad_(True)
        g_norm = self.g.step()
        self.ema.update(self.g.module)
        totals /= accumulation
        means = {"loss": totals[0], "g_loss": totals[2]} | ({"r1": totals[1]} if regularise else {})
        return means, {"grad_norm": float(d_norm), "g_grad_norm": float(g_norm), "lr": self.g.lr()}

    def discriminator_loss(self, real: torch.Tensor, labels: torch.Tensor | None, regularise: bool):
        """D's loss on one micro-batch: reals and fresh fakes in one forward, + lazy R1 when due."""
        with torch.no_grad():
            fakes = self.g.module(self.latents(len(real)), labels)
        both = None if labels is None else torch.cat([labels, labels])
        real_scores, fake_scores = self.d.forward(torch.cat([real, fakes]), both).float().chunk(2)
        loss = discriminator_loss(real_scores, fake_scores)
        r1 = torch.zeros((), device=real.device)
        if regularise:
            # Its own forward through the unwrapped D: DeepSpeed forbids autograd.grad through its forward's
            # output; the penalty's gradient still reaches D's weights in the engine's backward below.
            real = real.detach().requires_grad_(True)
            r1 = r1_penalty(self.d.module(real, labels).float(), real)
            loss = loss + 0.5 * self.model_spec.r1_gamma * self.model_spec.r1_interval * r1
        return loss, r1

    def eval_loss(self, next_batch: NextBatch, batches: int) -> torch.Tensor:
        """D's loss on held-out reals vs EMA-G fakes (noise fixed by a seed): watches D overfitting."""
        total = torch.zeros(1, dtype=torch.float64, device=self.world.device)
        generator = torch.Generator().manual_seed(self.spec.schedule.seed)
        self.d.module.eval()
        with torch.no_grad():
            for _ in range(batches):
                batch = next_batch().to(self.world.device)
                labels = self.labels_of(batch)
                fakes = self.ema.module(self.latents(len(batch.images), generator), labels)
                total += discriminator_loss(self.d.module(batch.images, labels), self.d.module(fakes, labels))
        self.d.module.train()
        return total / batches

    def generate(self, labels: torch.Tensor | None, count: int, seed: int, use_ema: bool = True) -> torch.Tensor:
        """`count` images in [-1, 1] from the EMA generator (or the raw one, in eval mode)."""
        generator = self.ema.module if use_ema else self.g.module
        return sample_gan(generator, labels, count, self.model_spec.generator.z_dim, seed, self.world.device)

    def sample(self, seed: int) -> Sample | None:
        return class_grid(self.generate, self.model_spec.num_classes, self.spec.logging.sample_rows, seed)
