"""Model section: a discriminated union on `family` (gpt now; diffusion and gan plug in beside it)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from ember.spec.base import Section
from ember.spec.generative import DiffusionSpec, GANSpec


class MoESpec(Section):
    num_experts: int = Field(8, ge=1, description="Experts per MoE layer.")
    top_k: int = Field(1, ge=1, le=2, description="Experts each token is routed to (1 or 2).")
    capacity_factor: float = Field(
        1.25, gt=0, description="Training capacity per expert, as a multiple of tokens/experts."
    )
    eval_capacity_factor: float = Field(2.0, gt=0, description="Capacity factor used in evaluation and generation.")
    min_capacity: int = Field(4, ge=0, description="Lower bound on the per-expert capacity.")
    drop_tokens: bool = Field(True, description="Drop tokens over capacity; false routes every token (dropless).")
    ep_size: int = Field(1, ge=1, description="Expert-parallel group size: experts are split over this many ranks.")
    every_n_layers: int = Field(2, ge=1, description="Every n-th transformer block uses a MoE FFN (the others dense).")
    aux_loss_weight: float = Field(0.01, ge=0, description="Weight of the load-balancing loss added to the LM loss.")
    impl: Literal["deepspeed"] = Field("deepspeed", description="MoE implementation: DeepSpeed's MoE layer.")

    @model_validator(mode="after")
    def _check(self) -> MoESpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.num_experts % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide num_experts={self.num_experts}")
        return self


class GPTSpec(Section):
    family: Literal["gpt"] = Field("gpt", description="Model family: a decoder-only transformer.")
    vocab_size: int = Field(256, ge=2, description="Vocabulary size; 256 for byte-level text.")
    d_model: int = Field(192, ge=8, description="Residual stream width.")
    n_layers: int = Field(4, ge=1, description="Transformer blocks.")
    n_heads: int = Field(6, ge=1, description="Attention heads; must divide d_model.")
    d_ff: int | None = Field(None, ge=1, description="FFN hidden width; default 4 * d_model.")
    seq_len: int = Field(128, ge=2, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability (0 keeps runs deterministic).")
    tie_embeddings: bool = Field(True, description="Share the input embedding and the output projection.")
    activation_checkpointing: bool = Field(False, description="Recompute block activations in backward to save memory.")
    moe: MoESpec | None = Field(None, description="Mixture-of-Experts FFNs; absent for a dense model.")

    @model_validator(mode="after")
    def _check(self) -> GPTSpec:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        return self

    @property
    def ffn_width(self) -> int:
        return self.d_ff or 4 * self.d_model


def _family(raw: Any) -> str:
    """`family` picks the model; a section without one is a gpt, as before other families existed."""
    family = raw.get("family", "gpt") if isinstance(raw, dict) else getattr(raw, "family", "gpt")
    return family if isinstance(family, str) else "gpt"


ModelSpec = Annotated[
    Annotated[GPTSpec, Tag("gpt")] | Annotated[DiffusionSpec, Tag("diffusion")] | Annotated[GANSpec, Tag("gan")],
    Discriminator(_family),
]
