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


def experts_of_rank(model: GPTSpec, manifest: dict[str, Any], ep_size: int, ep_rank: int) -> dict[int, list[int]]:
    """MoE block index -> the global expert ids serving rank `ep_rank` of `ep_size` holds."""
    placed = manifest.get("placement") or {}
    held = {}
    for block in model.moe_layers:
        count = model.moe_layer_spec(block).num_experts
        share = count // ep_size
        held[block] = list(range(ep_rank * share, (ep_rank + 1) * share))
        recorded = placed.get("layers", {}).get(str(block))
        if placed.get("ep_size") == ep_size and recorded is not None:
            from_manifest = sorted(int(e) for e, rank in recorded.items() if rank == ep_rank)
            if from_manifest != held[block]:  # the model's layers hold a contiguous block of global ids
                raise UserError(
                    f"manifest placement of block {block} gives EP rank {ep_rank} experts {from_manifest}; "
                    f"ember's layers hold contiguous blocks ({held[block]}): the manifest does not match this code"
                )
    return held
