"""A GPT in plain torch (nanoGPT's shape): dense or Mixture-of-Experts FFNs, no distributed code."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ember.models.layers.attention import CausalSelfAttention, KVCache, RaggedKV, Rotary, rotary_tables
from ember.models.layers.mlp import MLP
from ember.models.layers.moe import MoEFFN, build_moe_ffn
from ember.models.layers.norm import build_norm
from ember.spec.model import GPTSpec, MoESpec
from ember.world import ExpertPlacement


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    aux_loss: torch.Tensor  # sum of MoE load-balancing losses; 0 for a dense model


class Block(nn.Module):
    def __init__(self, spec: GPTSpec, moe: MoESpec | None, placement: ExpertPlacement | None) -> None:
        super().__init__()
        self.ln1 = build_norm(spec.norm, spec.d_model, spec.norm_eps, spec.bias)
        self.attn = CausalSelfAttention(spec.d_model, spec.n_heads, spec.dropout, spec.bias, spec.kv_heads)
        self.ln2 = build_norm(spec.norm, spec.d_model, spec.norm_eps, spec.bias)
        if moe is not None:
            self.ffn = build_moe_ffn(spec.d_model, spec.ffn_width, moe, placement, spec.dropout, spec.mlp, spec.bias)
        else:
            self.ffn = MLP(spec.d_model, spec.ffn_width, spec.dropout, spec.mlp, spec.bias)

    def forward(
        self, x: torch.Tensor, kv: RaggedKV | None = None, rotary: Rotary | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln1(x), kv, rotary)
        out = self.ffn(self.ln2(x))
        if isinstance(out, tuple):
            return x + out[0], out[1]
        return x + out, x.new_zeros(())


class GPT(nn.Module):
    def __init__(self, spec: GPTSpec, placement: ExpertPlacement | None = None, seed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.d_model)
        if spec.position == "learned":
            self.pos_emb = nn.Embedding(spec.seq_len, spec.d_model)
        self.blocks = nn.ModuleList(Block(spec, self._moe_spec(i), placement) for i in range(spec.n_layers))
        self.ln_f = build_norm(spec.norm, spec.d_model, spec.norm_eps, spec.bias)
        self.head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self._init_weights(seed)

    def _moe_spec(self, index: int) -> MoESpec | None:
        return self.spec.moe_layer_spec(index) if index in self.spec.moe_layers else None

    def _init_weights(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        init_module(self, generator, self.spec.n_layers, skip=MoEFFN)
        for index, block in enumerate(self.blocks):
            if isinstance(block.ffn, MoEFFN):
                block.ffn.init_experts(seed, index, lambda m, g: init_module(m, g, self.spec.n_layers))

    def forward(self, idx: torch.Tensor, kv: RaggedKV | None = None) -> ModelOutput:
        """idx [B, T]; with `kv`, idx is [1, N]: several sequences' new tokens end to end, each after its cache."""
        positions = kv.positions(idx.device) if kv is not None else torch.arange(idx.shape[1], device=idx.device)
        x, rotary = self._embed(idx, positions)
        aux_total = x.new_zeros(())
        for index, block in enumerate(self.blocks):
            if self.spec.activation_checkpointing and self.training:
                x, aux = checkpoint(block, x, None, rotary, use_reentrant=False)
            else:
                x, aux = block(x, kv.at_layer(index) if kv is not None else None, rotary)
            aux_total = aux_total + aux
        if kv is not None:
            kv.advance()
        return ModelOutput(self.head(self.ln_f(x)), aux_total)

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Rotary | None]:
        """Token embeddings plus learned positions, or with RoPE the rotary tables the attention layers use."""
        x = self.tok_emb(idx)
        if self.spec.position == "learned":
            return x + self.pos_emb(positions), None
        head_dim = self.spec.d_model // self.spec.n_heads
        return x, rotary_tables(positions, head_dim, self.spec.rope_theta, x.dtype)

    def new_cache(self) -> KVCache:
        """An empty key/value cache for one sequence of up to seq_len positions."""
        return KVCache(self.spec.n_layers, self.spec.seq_len)


def init_module(module: nn.Module, generator: torch.Generator, n_layers: int, skip: type | None = None) -> None:
    """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers); deterministic per generator."""
    for name, child in module.named_modules():
        if skip is not None and _inside(name, module, skip):
            continue
        if isinstance(child, nn.Linear):
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith("proj") else 0.02
            with torch.no_grad():
                child.weight.copy_(torch.randn(child.weight.shape, generator=generator) * std)
                if child.bias is not None:
                    child.bias.zero_()
        elif isinstance(child, nn.Embedding):
            with torch.no_grad():
                child.weight.copy_(torch.randn(child.weight.shape, generator=generator) * 0.02)


def _inside(name: str, root: nn.Module, kind: type) -> bool:
    """True when the submodule at `name` lies inside a module of type `kind` (but the gate stays ours)."""
    parts = name.split(".") if name else []
    node = root
    for part in parts:
        node = getattr(node, part)
        if isinstance(node, kind):
            return "deepspeed_experts" in name
    return False


def build_model(spec: GPTSpec, placement: ExpertPlacement | None = None, seed: int = 0) -> GPT:
    """placement: this rank's experts (World.expert_placement); None: EP rank 0's."""
    return GPT(spec, placement, seed)
