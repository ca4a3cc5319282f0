"""The dense feed-forward block (also the expert of a MoE layer): GELU (GPT-2) or SwiGLU (Llama).

    gelu    proj(gelu_tanh(fc(x)))
    swiglu  proj(silu(gate(x)) * fc(x))     (fc is Llama's up_proj, gate its gate_proj, proj its down_proj)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, kind: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        if kind == "swiglu":
            self.gate = nn.Linear(d_model, d_ff, bias=bias)
        else:
            self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.gate(x)) * self.fc(x) if self.kind == "swiglu" else self.act(self.fc(x))
        return self.drop(self.proj(hidden))
