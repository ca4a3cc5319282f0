"""A small class-conditional U-Net noise predictor (the ADM shape at toy scale), plain torch.

Input: noisy images [B, C, H, W], timesteps [B] and labels [B] (label `num_classes` means "no class", the
slot classifier-free guidance trains by label dropout). Output: the predicted eps or v, same shape as x.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ember.spec.generative import DiffusionSpec


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the (integer) timestep, as in the Transformer and DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ConditionEmbedding(nn.Module):
    """Timestep + class -> one vector each block adds to its features; the last class row is 'no class'."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.width = width
        self.time = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, 4 * width))
        self.classes = nn.Embedding(num_classes + 1, 4 * width) if num_classes else None

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.width))
        if self.classes is not None and labels is not None:
            emb = emb + self.classes(labels)
        return emb


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Global self-attention over the pixels of the lowest resolution."""

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, self.heads, channels // self.heads, -1).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
        return x + self.proj(out.transpose(2, 3).reshape(batch, channels, height, width))


class UNet(nn.Module):
    def __init__(self, spec: DiffusionSpec) -> None:
        super().__init__()
        width, levels = spec.width, [spec.width * m for m in spec.channel_mults]
        emb_dim = 4 * width
        self.condition = ConditionEmbedding(width, spec.num_classes)
        self.stem = nn.Conv2d(spec.channels, width, 3, padding=1)
        self.down, skip_channels, ch = nn.ModuleList(), [width], width
        for index, out_ch in enumerate(levels):
            for _ in range(spec.blocks_per_level):
                self.down.append(ResBlock(ch, out_ch, emb_dim))
                ch = out_ch
                skip_channels.append(ch)
            if index < len(levels) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_channels.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim), SelfAttention2d(ch), ResBlock(ch, ch, emb_dim)])
        self.up = nn.ModuleList()
        for index, out_ch in reversed(list(enumerate(levels))):
            for _ in range(spec.blocks_per_level + 1):
                self.up.append(ResBlock(ch + skip_channels.pop(), out_ch, emb_dim))
                ch = out_ch
            if index > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.head = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, spec.channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.condition(t, labels)
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.head(h)
