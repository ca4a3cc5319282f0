"""A serving rank's model from a checkpoint: the dense weights and only this rank's experts.

DeepSpeed checkpoints keep one file per expert (`layer_L_expert_E_mp_rank_00_model_states.pt`, keys under
global ids), so a rank opens only its own experts' files. Other engines (DDP, FSDP, fairscale: EP=1 only)
save the whole module, which is read whole and cut down.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ember.checkpoint.readers import read_checkpoint_spec
from ember.engines.weights import full_state_dict
from ember.errors import UserError
from ember.models import GPT, build_model
from ember.models.layers.moe.layouts import EXPERT_NAME, to_per_expert_layout
from ember.serve.placement import experts_of_rank, serving_placement, serving_spec
from ember.spec import JobSpec

BLOCK = re.compile(r"^blocks\.(\d+)\.")


def load_rank_model(path: Path, ep_size: int = 1, ep_rank: int = 0, verify: bool = True) -> tuple[GPT, JobSpec]:
    """The GPT of serving rank ep_rank of ep_size, weights loaded (strict), in eval mode."""
    checkpoint, manifest, spec = read_checkpoint_spec(path, verify)
    if spec.model.family != "gpt":
        raise UserError(f"{checkpoint}: a {spec.model.family} checkpoint; text generation needs a gpt")
    model_spec = serving_spec(spec, ep_size)
    placement = serving_placement(model_spec, ep_size, ep_rank)
    model = build_model(model_spec, placement, seed=spec.schedule.seed)
    held = experts_of_rank(model_spec, manifest, placement) if placement is not None else {}
    model.load_state_dict(rank_state_dict(checkpoint / "engine", spec, held), strict=True)
    return model.eval(), spec


def rank_state_dict(engine_dir: Path, spec: JobSpec, held: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """Dense tensors plus the held experts, renumbered to the rank's local ids (per-expert layout)."""
    if spec.engine.kind == "deepspeed" and spec.model.moe is not None:
        from ember.engines.deepspeed.layout import held_weights

        state = held_weights(engine_dir, spec.model.moe_layers, held)
    else:
        state = full_state_dict(engine_dir, spec)
        for block in spec.model.moe_layers:  # stacked [E, ...] tensors -> one entry per global expert
            to_per_expert_layout(state, f"blocks.{block}.ffn.moe.", spec.model.moe_layer_spec(block).num_experts)
    return {_local_name(name, held): tensor.float() for name, tensor in state.items() if _is_held(name, held)}


def _is_held(name: str, held: dict[int, list[int]]) -> bool:
    expert = EXPERT_NAME.match(name)
    return expert is None or int(expert.group(2)) in held[int(BLOCK.match(name).group(1))]


def _local_name(name: str, held: dict[int, list[int]]) -> str:
    expert = EXPERT_NAME.match(name)
    if expert is None:
        return name
    prefix, number, rest = expert.groups()
    return f"{prefix}{held[int(BLOCK.match(name).group(1))].index(int(number))}{rest}"
