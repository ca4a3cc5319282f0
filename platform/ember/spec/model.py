"""Model section: a discriminated union on `family` (gpt now; diffusion and gan plug in beside it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ember.spec.base import Section, tagged_union
from ember.spec.generative import DiffusionSpec, GANSpec
from ember.spec.moe import MoEBlocks, MoESpec


class GPTSpec(MoEBlocks, Section):
    family: Literal["gpt"] = Field("gpt", description="Model family: a decoder-only transformer.")
    vocab_size: int = Field(256, ge=2, description="Vocabulary size; 256 for byte-level text.")
    d_model: int = Field(192, ge=8, description="Residual stream width.")
    n_layers: int = Field(4, ge=1, description="Transformer blocks.")
    n_heads: int = Field(6, ge=1, description="Attention heads; must divide d_model.")
    n_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads (grouped-query attention, as Llama 3 and Mixtral); must divide "
        "n_heads. Default: n_heads (multi-head attention).",
    )
    d_ff: int | None = Field(None, ge=1, description="FFN hidden width; default 4 * d_model.")
    seq_len: int = Field(128, ge=2, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability (0 keeps runs deterministic).")
    tie_embeddings: bool = Field(True, description="Share the input embedding and the output projection.")
    norm: Literal["layernorm", "rmsnorm"] = Field(
        "layernorm", description="Block and final normalisation: LayerNorm (GPT-2) or RMSNorm (Llama)."
    )
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of every normalisation layer.")
    position: Literal["learned", "rope"] = Field(
        "learned", description="Positions: a learned embedding added to the input (GPT-2), or rotary (RoPE, Llama)."
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency (position: rope).")
    mlp: Literal["gelu", "swiglu"] = Field(
        "gelu", description="FFN (and MoE expert) kind: GELU MLP (GPT-2) or SwiGLU (Llama, Mixtral)."
    )
    bias: bool = Field(True, description="Biases in linear and norm layers (false: none, as in Llama).")
    init_from: str | None = Field(
        None,
        description="A Hugging Face checkpoint folder (LlamaForCausalLM, GPT2LMHeadModel, MixtralForCausalLM, "
        "Qwen2MoeForCausalLM) to start from; its config must match this section field by field.",
    )
    activation_checkpointing: bool = Field(False, description="Recompute block activations in backward to save memory.")
    moe: MoESpec | None = Field(None, description="Mixture-of-Experts FFNs; absent for a dense model.")

    @model_validator(mode="after")
    def _check(self) -> GPTSpec:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.kv_heads != self.n_heads and self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.position == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"position: rope needs an even d_model / n_heads, not {self.d_model // self.n_heads}")
        if self.moe is not None and self.moe.impl == "deepspeed" and (self.mlp != "gelu" or not self.bias):
            raise ValueError("moe.impl: deepspeed needs mlp: gelu and bias: true (its experts are ember's GELU MLP)")
        counts = self.moe and self.moe.experts_per_layer
        if counts and len(counts) != len(self.moe_layers):
            raise ValueError(
                f"moe.experts_per_layer has {len(counts)} entries; the model has {len(self.moe_layers)} MoE layers "
                f"(blocks {self.moe_layers}: every {self.moe.every_n_layers}-th of n_layers={self.n_layers})"
            )
        return self

    @property
    def block_count(self) -> int:
        return self.n_layers

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_width(self) -> int:
        return self.d_ff or 4 * self.d_model


# A section without `family` is a gpt, as before other families existed.
ModelSpec = tagged_union("family", "gpt", GPTSpec, DiffusionSpec, GANSpec)
