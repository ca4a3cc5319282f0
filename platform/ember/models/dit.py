"""A small DiT (Peebles & Xie): patchify, transformer blocks with adaLN-Zero conditioning on (timestep,
class), unpatchify. Plain torch; same call signature as the U-Net: model(x_t, t, labels).

With `moe`, every n-th block's FFN is ember's MoE layer (as in the GPT); the forward keeps returning the
prediction and leaves the blocks' summed load-balancing loss in `aux_loss`, which the diffusion objective
adds to its MSE. Under expert parallelism a rank builds only the experts its `placement` gives it, each initialised
from a seed of its global id, so any EP size holds the same experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.layers.moe import MoEFFN, build_moe_ffn
from ember.models.unet import ConditionEmbedding
from ember.spec.generative import DiffusionSpec
from ember.spec.moe import MoESpec
from ember.world import ExpertPlacement


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, cond_dim: int, moe: MoESpec | None = None,
                 placement: ExpertPlacement | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        if moe is not None:
            self.mlp = build_moe_ffn(width, 4 * width, moe, placement, dropout=0.0)
        else:
            self.mlp = nn.Sequential(
                nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width)
            )
        self.modulation = nn.Linear(cond_dim, 6 * width)
        nn.init.zeros_(self.modulation.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x, this block's MoE aux loss, 0 for a dense FFN)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond))[:, None].chunk(6, dim=2)
        h = self.norm1(x) * (1 + scale1) + shift1
        batch, length, width = h.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv(h).split(width, dim=2))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)
        x = x + gate1 * self.proj(h)
        out = self.mlp(self.norm2(x) * (1 + scale2) + shift2)
        out, aux = out if isinstance(self.mlp, MoEFFN) else (out, x.new_zeros(()))
        return x + gate2 * out, aux


class DiT(nn.Module):
    def __init__(self, spec: DiffusionSpec, placement: ExpertPlacement | None = None, seed: int = 0) -> None:
        super().__init__()
        self.patch, self.channels = spec.patch_size, spec.channels
        self.side = spec.image_size // spec.patch_size
        width = spec.width
        self.condition = ConditionEmbedding(width, spec.num_classes)
        self.embed = nn.Conv2d(spec.channels, width, spec.patch_size, stride=spec.patch_size)
        self.position = nn.Parameter(torch.randn(1, self.side**2, width) * 0.02)
        self.blocks = nn.ModuleList(
            DiTBlock(width, spec.heads, 4 * width, spec.moe_layer_spec(i) if i in spec.moe_layers else None,
                     placement)
            for i in range(spec.depth)
        )
        for index, block in enumerate(self.blocks):
            if isinstance(block.mlp, MoEFFN):
                block.mlp.init_experts(seed, index, linear_default_init)
        self.aux_loss = torch.zeros(())  # the last forward's summed MoE load-balancing loss
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.out = nn.Linear(width, spec.patch_size**2 * spec.channels)
        self.final_modulation = nn.Linear(4 * width, 2 * width)
        for layer in (self.out, self.final_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.condition(t, labels)
        h = self.embed(x).flatten(2).transpose(1, 2) + self.position
        aux_total = h.new_zeros(())
        for block in self.blocks:
            h, aux = block(h, cond)
            aux_total = aux_total + aux
        self.aux_loss = aux_total
        shift, scale = self.final_modulation(F.silu(cond))[:, None].chunk(2, dim=2)
        h = self.out(self.norm(h) * (1 + scale) + shift)  # [B, patches, p * p * C]
        batch, p, side = x.shape[0], self.patch, self.side
        h = h.view(batch, side, side, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(batch, self.channels, side * p, side * p)


def linear_default_init(module: nn.Module, generator: torch.Generator) -> None:
    """nn.Linear's own initialisation (uniform, bound 1/sqrt(fan_in)) of every Linear, drawn from `generator`."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
