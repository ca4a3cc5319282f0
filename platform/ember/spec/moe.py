"""The `moe` sub-section shared by the GPT and the diffusion DiT: how many experts, routing, capacity, EP."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ember.spec.base import Section


class MoESpec(Section):
    num_experts: int = Field(8, ge=1, description="Experts per MoE layer (every layer, unless experts_per_layer).")
    experts_per_layer: list[int] | None = Field(
        None,
        description="PR-MoE (DeepSpeed-MoE): experts of each MoE layer, shallow to deep, usually more in deeper "
        "layers, e.g. [4, 8]; one entry per MoE layer. Overrides num_experts.",
    )
    top_k: int = Field(1, ge=1, le=8, description="Experts each token is routed to (1 to 8).")
    scoring: Literal["softmax", "sigmoid"] = Field(
        "softmax",
        description="Router scores: softmax over experts (Mixtral, Qwen-MoE), or a sigmoid per expert (DeepSeek-V3).",
    )
    norm_topk_prob: bool | None = Field(
        None,
        description="Renormalise the chosen experts' scores to sum to 1 (Mixtral: true). Default: true for top_k >= 2 "
        "and for sigmoid scoring, false for softmax top-1 (weight = p, as Switch and DeepSpeed).",
    )
    balance: Literal["aux_loss", "bias"] = Field(
        "aux_loss",
        description="Load balancing: the auxiliary loss, or DeepSeek-V3's auxiliary-loss-free bias (a per-expert bias "
        "added to the scores for the choice only, raised for underloaded experts after every step).",
    )
    bias_update_rate: float = Field(
        1e-3, gt=0, description="balance: bias: how far each step moves an expert's bias (DeepSeek-V3's gamma)."
    )
    shared_experts: int = Field(
        0, ge=0, description="Always-on experts beside the routed ones (DeepSeek-MoE, Qwen-MoE); one FFN this wide."
    )
    shared_expert_gate: bool = Field(
        False, description="Scale the shared experts' output by sigmoid(x . w) (Qwen-MoE's gate); false: unscaled."
    )
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
        ember_only = self.scoring != "softmax" or self.balance != "aux_loss" or self.shared_experts or self.top_k > 2
        if self.impl == "deepspeed" and ember_only:
            raise ValueError("scoring, balance, shared_experts and top_k > 2 need impl: ember (DeepSpeed's has none)")
        if self.impl == "deepspeed" and (self.z_loss_weight > 0 or self.noisy_gating or self.routing != "token_choice"):
            raise ValueError(
                "z_loss_weight, noisy_gating and routing: expert_choice need impl: ember (DeepSpeed's gate has none)"
            )
        if self.routing == "expert_choice" and (self.scoring != "softmax" or self.balance != "aux_loss"):
            raise ValueError("routing: expert_choice needs scoring: softmax and balance: aux_loss")
        if self.z_loss_weight > 0 and self.aux_loss_weight == 0:
            # The layer folds the z-loss into its aux term as z_loss_weight / aux_loss_weight (see moe/layer.py).
            raise ValueError("z_loss_weight > 0 needs aux_loss_weight > 0")
        return self

    @property
    def normalises_topk(self) -> bool:
        """Whether the chosen experts' weights are renormalised to sum to 1 (norm_topk_prob, resolved)."""
        if self.norm_topk_prob is not None:
            return self.norm_topk_prob
        return self.top_k > 1 or self.scoring == "sigmoid"

    @property
    def expert_counts(self) -> list[int]:
        """The distinct expert counts of the MoE layers."""
        return sorted(set(self.experts_per_layer or [self.num_experts]))

    def layer(self, moe_index: int) -> MoESpec:
        """The spec of the moe_index-th MoE layer: num_experts is that layer's (PR-MoE), the rest shared."""
        if not self.experts_per_layer:
            return self
        return self.model_copy(update={"num_experts": self.experts_per_layer[moe_index], "experts_per_layer": None})


def single_process(model_spec):
    """The same model section with every expert local (moe.ep_size 1): what export, eval and serving build to
    load a checkpoint's whole weights, whatever EP size trained it."""
    moe = getattr(model_spec, "moe", None)
    if moe is None or moe.ep_size == 1:
        return model_spec
    return model_spec.model_copy(update={"moe": moe.model_copy(update={"ep_size": 1})})


class MoEBlocks:
    """For a model section with a `moe` field and a `block_count` property: which blocks hold MoE FFNs.
    (No annotations here: pydantic would read them as fields.)"""

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the blocks whose FFN is a MoE layer: every moe.every_n_layers-th."""
        if self.moe is None:
            return []
        return [i for i in range(self.block_count) if (i + 1) % self.moe.every_n_layers == 0]

    def moe_layer_spec(self, block: int) -> MoESpec:
        """The MoE spec of one block (its own expert count under PR-MoE)."""
        return self.moe.layer(self.moe_layers.index(block))
