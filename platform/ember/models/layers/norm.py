"""The normalisation layer a spec names: LayerNorm (GPT-2) or RMSNorm (Llama), with or without a bias."""

from __future__ import annotations

from torch import nn


def build_norm(kind: str, width: int, eps: float, bias: bool = True) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(width, eps=eps)
    return nn.LayerNorm(width, eps=eps, bias=bias)
