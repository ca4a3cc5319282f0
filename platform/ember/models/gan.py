"""DCGAN-style class-conditional generator and projection discriminator, plain torch.

G: latent z and a class -> a 4x4 feature map -> (upsample, conv) until image_size -> tanh image in [-1, 1].
D: (conv, stride-2 conv) down to 4x4 -> a realness score, plus the projection term <embed(class), features>
(Miyato & Koyama) that makes D class-aware at almost no cost.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ember.spec.generative import GANSpec


def stages(image_size: int) -> int:
    """Doublings from 4x4 to image_size."""
    return int(math.log2(image_size // 4))


class Generator(nn.Module):
    def __init__(self, spec: GANSpec) -> None:
        super().__init__()
        g = spec.generator
        self.z_dim, self.num_classes = g.z_dim, spec.num_classes
        top = g.width * 2 ** stages(spec.image_size)
        self.classes = nn.Embedding(spec.num_classes, g.z_dim) if spec.num_classes else None
        self.project = nn.Sequential(nn.Linear(g.z_dim, top * 16), nn.Unflatten(1, (top, 4, 4)))
        self.norm = nn.BatchNorm2d(top)
        blocks, ch = [], top
        for _ in range(stages(spec.image_size)):
            blocks += [nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch // 2, 3, padding=1), nn.BatchNorm2d(ch // 2)]
            blocks.append(nn.ReLU())
            ch //= 2
        self.body = nn.Sequential(*blocks, nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(ch, spec.channels, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.classes is not None and labels is not None:
            z = z * self.classes(labels)  # multiplicative class conditioning of the latent
        h = F.relu(self.norm(self.project(z)))
        return torch.tanh(self.head(self.body(h)))


class Discriminator(nn.Module):
    def __init__(self, spec: GANSpec) -> None:
        super().__init__()
        width = spec.discriminator.width
        layers, ch = [nn.Conv2d(spec.channels, width, 3, padding=1), nn.LeakyReLU(0.2)], width
        for _ in range(stages(spec.image_size)):
            layers += [nn.Conv2d(ch, ch * 2, 3, padding=1), nn.LeakyReLU(0.2)]
            layers += [nn.Conv2d(ch * 2, ch * 2, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            ch *= 2
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(ch * 16, ch), nn.LeakyReLU(0.2))
        self.score = nn.Linear(ch, 1)
        self.classes = nn.Embedding(spec.num_classes, ch) if spec.num_classes else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        features = self.body(images)
        score = self.score(features).squeeze(1)
        if self.classes is not None and labels is not None:
            score = score + (self.classes(labels) * features).sum(1)
        return score
