"""Which experts each serving rank holds, and the model a rank builds for serving.

With as many ranks as training had EP ranks, rank r holds what the checkpoint manifest placed on EP rank r;
with another number it holds an even, contiguous share (the same rule training uses), which is how an EP=2
checkpoint is served on 1 rank or an EP=1 checkpoint on 2. Experts are stored under global ids, so any
split that divides every MoE layer's expert count loads without conversion.
"""

from __future__ import annotations

from typing import Any

from ember.errors import UserError
from ember.spec import JobSpec
from ember.spec.model import GPTSpec
from ember.world import ExpertPlacement


def serving_spec(spec: JobSpec, ep_size: int) -> GPTSpec:
    """The trained GPT with experts split over ep_size ranks, routed dropless: in continuous batching a token's
    output must not depend on which other sequences share its step (capacity drops would make it)."""
    model = spec.model
    if model.moe is None:
        if ep_size != 1:
            raise UserError(f"--ep {ep_size}: this checkpoint's model is dense; serve it with --ep 1")
        return model
    for count in model.moe.expert_counts:
        if count % ep_size:
            raise UserError(f"--ep {ep_size} must divide the number of experts of every MoE layer ({count})")
    return model.model_copy(update={"moe": model.moe.model_copy(update={"ep_size": ep_size, "drop_tokens": False})})


def serving_placement(model: GPTSpec, ep_size: int, ep_rank: int) -> ExpertPlacement | None:
    """Serving rank `ep_rank` of `ep_size` (model: the serving_spec) is EP rank ep_rank; None for a dense model."""
    return None if model.moe is None else ExpertPlacement(model.moe.num_experts, ep_size, ep_rank)


def experts_of_rank(model: GPTSpec, manifest: dict[str, Any], placement: ExpertPlacement) -> dict[int, list[int]]:
    """MoE block index -> the global expert ids the serving rank at `placement` holds."""
    placed = manifest.get("placement") or {}
    held = {}
    ep_rank = placement.ep_rank
    for block in model.moe_layers:
        held[block] = list(placement.for_experts(model.moe_layer_spec(block).num_experts).local_experts)
        recorded = placed.get("layers", {}).get(str(block))
        if placed.get("ep_size") == placement.ep_size and recorded is not None:
            from_manifest = sorted(int(e) for e, rank in recorded.items() if rank == ep_rank)
            if from_manifest != held[block]:  # the model's layers hold a contiguous block of global ids
                raise UserError(
                    f"manifest placement of block {block} gives EP rank {ep_rank} experts {from_manifest}; "
                    f"ember's layers hold contiguous blocks ({held[block]}): the manifest does not match this code"
                )
    return held
