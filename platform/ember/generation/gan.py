"""GAN sampling: images from a generator and seeded latents (the training samples, eval and serving alike)."""

from __future__ import annotations

import torch
from torch import nn


def latents(count: int, z_dim: int, generator: torch.Generator | None = None,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal z, drawn on the CPU (a seeded CPU generator gives the same z on any device)."""
    return torch.randn(count, z_dim, generator=generator).to(device)


@torch.no_grad()
def sample_gan(generator: nn.Module, labels: torch.Tensor | None, count: int, z_dim: int, seed: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """`count` images in [-1, 1] from z seeded by `seed` (labels: one per image, or None), in eval mode."""
    was_training = generator.training
    generator.eval()
    z = latents(count, z_dim, torch.Generator().manual_seed(seed), device)
    images = generator(z, None if labels is None else labels.to(device))
    generator.train(was_training)
    return images
