"""Class-conditional GAN networks, plain torch.

G (`dcgan`): latent z and a class -> a 4x4 feature map -> (upsample, conv) until image_size -> tanh image.
G (`stylegan2`): a mapping MLP turns (z, class) into a style w; from a learned 4x4 constant, every conv's
weights are scaled per sample by an affine map of w and then demodulated to unit output variance
(StyleGAN2's modulated convolution, without its noise inputs, so a seed fixes a sample).
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


class ModulatedConv2d(nn.Module):
    """StyleGAN2's conv: weight * style (per input channel, per sample), demodulated per output channel.

    Run in StyleGAN2's non-fused form: scale the input channels by the style, one convolution with the
    shared weights for the whole batch, scale the output channels by the demodulation coefficients. The
    same function as a grouped convolution with per-sample weights, 3x faster on CPU, where grouped
    convolutions are slow. Weights are stored N(0, 1) and scaled at run time (equalised learning rate)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, w_dim: int, demodulate: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.scale = 1 / math.sqrt(in_ch * kernel * kernel)
        self.affine = nn.Linear(w_dim, in_ch)
        nn.init.ones_(self.affine.bias)  # styles start at 1: the plain conv
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.demodulate, self.padding = demodulate, kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w)  # [B, in]
        weight = self.weight * self.scale
        out = F.conv2d(x * styles[:, :, None, None], weight, padding=self.padding)
        if self.demodulate:  # 1 / ||weight * style|| per (sample, output channel), without forming that weight
            energy = styles.pow(2) @ weight.pow(2).sum(dim=(2, 3)).t()  # [B, out]
            out = out * torch.rsqrt(energy + 1e-8)[:, :, None, None]
        return out + self.bias[None, :, None, None]


class MappingLinear(nn.Module):
    """StyleGAN's equalised-learning-rate layer with a learning-rate multiplier: weights stored N(0, 1/lr_mul^2)
    and scaled by lr_mul / sqrt(fan_in) at run time, so Adam moves the mapping network lr_mul times as fast
    as the rest (StyleGAN2 uses 0.01) while its initial function is a plain N(0, 1/fan_in) layer."""

    def __init__(self, cin: int, cout: int, lr_mul: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(cout))
        self.gain, self.lr_mul = lr_mul / math.sqrt(cin), lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.gain, self.bias * self.lr_mul)


class StyleGenerator(nn.Module):
    """A small StyleGAN2-style G with the same call as the DCGAN one: G(z, labels) -> images in [-1, 1]."""

    def __init__(self, spec: GANSpec) -> None:
        super().__init__()
        g = spec.generator
        self.z_dim, self.num_classes = g.z_dim, spec.num_classes
        w_dim = g.w_dim or g.z_dim
        self.classes = nn.Embedding(spec.num_classes, g.z_dim) if spec.num_classes else None
        layers, width = [], g.z_dim * (2 if spec.num_classes else 1)
        for _ in range(g.mapping_layers):
            layers += [MappingLinear(width, w_dim, g.mapping_lr_mul), nn.LeakyReLU(0.2)]
            width = w_dim
        self.mapping = nn.Sequential(*layers)
        top = g.width * 2 ** stages(spec.image_size)
        self.constant = nn.Parameter(torch.randn(1, top, 4, 4))
        self.convs, ch = nn.ModuleList([ModulatedConv2d(top, top, 3, w_dim)]), top
        for _ in range(stages(spec.image_size)):
            self.convs.append(ModulatedConv2d(ch, ch // 2, 3, w_dim))
            ch //= 2
        self.to_image = ModulatedConv2d(ch, spec.channels, 1, w_dim, demodulate=False)

    def style(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)  # pixel norm of the latent
        if self.classes is not None:
            embedded = self.classes(labels) if labels is not None else torch.zeros_like(z)
            z = torch.cat([z, embedded * torch.rsqrt(embedded.pow(2).mean(dim=1, keepdim=True) + 1e-8)], dim=1)
        return self.mapping(z)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        w = self.style(z, labels)
        x = self.constant.expand(z.shape[0], -1, -1, -1)
        for index, conv in enumerate(self.convs):
            if index > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = F.leaky_relu(conv(x, w), 0.2)
        return torch.tanh(self.to_image(x, w))


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
