"""Causal multi-head self-attention on top of scaled_dot_product_attention (flash/mem-efficient on GPUs).

Decoding reuses past keys and values: `KVCache` holds one sequence's, and `RaggedKV` runs attention for
several sequences whose new tokens lie end to end in one row (continuous batching: each has its own past).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """One sequence's past keys and values, per layer, in buffers of `capacity` positions allocated on first use."""

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0  # positions already cached (the same in every layer between forwards)
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [heads, new, head_dim] after the cached positions; return all keys and values so far."""
        end = self.length + k.shape[1]
        if end > self.capacity:
            raise ValueError(f"sequence of {end} positions exceeds the cache's {self.capacity}")
        if self.keys[layer] is None:
            self.keys[layer] = k.new_empty((k.shape[0], self.capacity, k.shape[2]))
            self.values[layer] = v.new_empty((v.shape[0], self.capacity, v.shape[2]))
        self.keys[layer][:, self.length : end] = k
        self.values[layer][:, self.length : end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]


@dataclass
class RaggedKV:
    """Sequences laid end to end in one row: lengths[i] new tokens of the sequence cached in caches[i]."""

    caches: list[KVCache]
    lengths: list[int]
    layer: int = 0

    def at_layer(self, layer: int) -> RaggedKV:
        return RaggedKV(self.caches, self.lengths, layer)

    def positions(self, device: torch.device) -> torch.Tensor:
        spans = [torch.arange(c.length, c.length + n) for c, n in zip(self.caches, self.lengths, strict=True)]
        return torch.cat(spans).to(device) if spans else torch.zeros(0, dtype=torch.long, device=device)

    def advance(self) -> None:
        """After a forward: the new tokens are now part of every sequence's past."""
        for cache, new in zip(self.caches, self.lengths, strict=True):
            cache.length += new

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [1, heads, N, head_dim] -> [1, heads, N, head_dim], each sequence over its own past."""
        outputs, start = [], 0
        for cache, new in zip(self.caches, self.lengths, strict=True):
            rows = slice(start, start + new)
            keys, values = cache.extend(self.layer, k[0, :, rows], v[0, :, rows])
            outputs.append(causal_attention(q[0, :, rows], keys, values, past=cache.length))
            start += new
        if not outputs:
            return torch.empty_like(q)
        return torch.cat(outputs, dim=1).unsqueeze(0)


def share_kv_heads(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: query head h reads key/value head h // (heads / kv_heads) (HF's repeat_kv)."""
    repeat = q.shape[-3] // keys.shape[-3]
    if repeat == 1:
        return keys, values
    return keys.repeat_interleave(repeat, dim=-3), values.repeat_interleave(repeat, dim=-3)


def causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int) -> torch.Tensor:
    """Queries at positions past..past+n-1 over keys 0..past+n-1: query j sees keys up to past + j."""
    keys, values = share_kv_heads(q, keys, values)
    new = q.shape[-2]
    if new == 1:  # one query (a decode step) sees every key: no mask to build
        return F.scaled_dot_product_attention(q, keys, values)
    if past == 0:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
    mask = torch.ones(new, keys.shape[-2], dtype=torch.bool, device=q.device).tril(past)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


Rotary = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) [T, head_dim] of the positions of a forward


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Rotary:
    """RoPE as Hugging Face's Llama lays it out: frequency i on dims i and i + head_dim / 2 (rotate_half),
    computed in fp32 (no buffer: a bf16 cast of the module would round the frequencies)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    with torch.autocast(positions.device.type, enabled=False):
        angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """x [..., T, head_dim] rotated by its positions' angles: x cos + rotate_half(x) sin."""
    cos, sin = rotary
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(
        self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True, n_kv_heads: int | None = None
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        kv_width = self.n_kv_heads * (d_model // n_heads)
        self.splits = (d_model, kv_width, kv_width)
        self.qkv = nn.Linear(d_model, sum(self.splits), bias=bias)  # rows: queries, keys, values, head after head
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, kv: RaggedKV | None = None, rotary: Rotary | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(self.splits, dim=2)
        head_dim = width // self.n_heads  # explicit: -1 is ambiguous for an empty batch
        q = q.view(batch, length, self.n_heads, head_dim).transpose(1, 2)
        k, v = (t.view(batch, length, self.n_kv_heads, head_dim).transpose(1, 2) for t in (k, v))
        if rotary is not None:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        if kv is not None:
            y = kv.attend(q, k, v)
        else:
            dropout = self.dropout if self.training else 0.0
            k, v = share_kv_heads(q, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))
