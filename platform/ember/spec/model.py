"""Model section: a discriminated union on `family` (gpt now; diffusion and gan plug in beside it)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from ember.spec.base import Section
from ember.spec.generative import DiffusionSpec, GANSpec


class MoESpec(Section):
    num_experts: int = Field(8, ge=1, description="Experts per MoE layer (every layer, unless experts_per_layer).")
    experts_per_layer: list[int] | None = Field(
        None,
        description="PR-MoE (DeepSpeed-MoE): experts of each MoE layer, shallow to deep, usually more in deeper "
        "layers, e.g. [4, 8]; one entry per MoE layer. Overrides num_experts.",
    )
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
    z_loss_weight: float = Field(
        0.0, ge=0, description="Weight of the router z-loss (ST-MoE: mean squared logsumexp of the router logits)."
    )
    noisy_gating: bool = Field(
        False, description="Noisy top-k gating (Shazeer et al.): learned Gaussian noise on router logits in training."
    )
    routing: Literal["token_choice", "expert_choice"] = Field(
        "token_choice",
        description="token_choice: each token picks its top_k experts. expert_choice (Zhou et al. 2022): each expert "
        "picks its capacity_factor x top_k x tokens / experts best tokens; balanced by construction, but not causal "
        "(a token's experts depend on the rest of the batch). impl: ember only.",
    )
    residual: bool = Field(
        False, description="Residual-MoE (DeepSpeed-MoE): a dense MLP beside the experts, mixed by a learned gate."
    )
    impl: Literal["ember", "deepspeed"] = Field(
        "ember", description="MoE implementation: ember's sort-based layer, or DeepSpeed's MoE layer."
    )

    @model_validator(mode="after")
    def _check(self) -> MoESpec:
        field = "experts_per_layer" if self.experts_per_layer else "num_experts"
        for count in self.expert_counts:
            if self.top_k > count:
                raise ValueError(f"top_k={self.top_k} exceeds {field}={count}")
            if count < 1 or count % self.ep_size:
                raise ValueError(f"ep_size={self.ep_size} must divide {field}={count}")
        if self.impl == "deepspeed" and (self.z_loss_weight > 0 or self.noisy_gating or self.routing != "token_choice"):
            raise ValueError(
                "z_loss_weight, noisy_gating and routing: expert_choice need impl: ember (DeepSpeed's gate has none)"
            )
        if self.z_loss_weight > 0 and self.aux_loss_weight == 0:
            # The layer folds the z-loss into its aux term as z_loss_weight / aux_loss_weight (see moe/layer.py).
            raise ValueError("z_loss_weight > 0 needs aux_loss_weight > 0")
        return self

    @property
    def expert_counts(self) -> list[int]:
        """The distinct expert counts of the MoE layers."""
        return sorted(set(self.experts_per_layer or [self.num_experts]))

    def layer(self, moe_index: int) -> MoESpec:
        """The spec of the moe_index-th MoE layer: num_experts is that layer's (PR-MoE), the rest shared."""
        if not self.experts_per_layer:
            return self
        return self.model_copy(update={"num_experts": self.experts_per_layer[moe_index], "experts_per_layer": None})


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
        counts = self.moe and self.moe.experts_per_layer
        if counts and len(counts) != len(self.moe_layers):
            raise ValueError(
                f"moe.experts_per_layer has {len(counts)} entries; the model has {len(self.moe_layers)} MoE layers "
                f"(blocks {self.moe_layers}: every {self.moe.every_n_layers}-th of n_layers={self.n_layers})"
            )
        return self

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the blocks whose FFN is a MoE layer."""
        if self.moe is None:
            return []
        return [i for i in range(self.n_layers) if (i + 1) % self.moe.every_n_layers == 0]

    def moe_layer_spec(self, block: int) -> MoESpec:
        """The MoE spec of one block (its own expert count under PR-MoE)."""
        return self.moe.layer(self.moe_layers.index(block))

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
