"""DeepSpeed's checkpoint files (ZeRO 0-2 and 3, with per-expert files), named once, and the readers of the
module weights in them that export, evaluation and serving use (checkpoint/ knows no engine's files).

    mp_rank_00_model_states.pt                     the module without experts (dp rank 0), counters, scheduler
    layer_L_expert_E_mp_rank_00_model_states.pt    one per MoE layer L (module order) and global expert E
    [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt   ZeRO-1/2 partitions of rank R
    expp_rank_E_mp_rank_00_optim_states.pt         ZeRO-0 with experts: the optimizer of EP rank E
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ember.checkpoint.io import load_file
from ember.errors import UserError
from ember.models.layers.moe.layouts import EXPERT_NAME

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")  # bf16_: bf16 ZeRO-1/2
EXPERT_OPTIM_FILE = "expp_rank_{}_mp_rank_00_optim_states.pt"
EXPERT_WEIGHTS_GLOB = "layer_*_expert_*_mp_rank_00_model_states.pt"
EXPERT_WEIGHTS_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")  # MoE layer, expert


def full_weights(engine_dir: Path, spec) -> dict[str, torch.Tensor]:
    """The whole module's fp32 weights, experts under global ids (spec: the JobSpec that trained it)."""
    if spec.engine.zero_stage == 3 or (spec.engine.precision != "fp32" and spec.model.moe is None):
        # Partitioned (ZeRO-3) or low-precision module weights: rebuild the fp32 masters from the shards.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(engine_dir.parent), tag=engine_dir.name)
    state = _load(engine_dir / MODEL_STATES)["module"]
    for expert_file in sorted(engine_dir.glob(EXPERT_WEIGHTS_GLOB)):
        state.update(_load(expert_file))  # keys already carry global expert ids
    return {name: tensor.float() for name, tensor in state.items()}


def held_weights(engine_dir: Path, moe_blocks: list[int], held: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """The dense weights and only the experts in `held` (MoE block -> global expert ids): a serving rank opens
    its own experts' files only. moe_blocks: the model's MoE blocks in order (DeepSpeed numbers them so)."""
    dense = load_file(engine_dir / MODEL_STATES)["module"]
    state = {name: tensor for name, tensor in dense.items() if not EXPERT_NAME.match(name)}
    found = 0
    for path in engine_dir.iterdir():
        match = EXPERT_WEIGHTS_FILE.match(path.name)
        if match is None:
            continue
        found += 1
        if int(match.group(2)) in held[moe_blocks[int(match.group(1))]]:
            state.update(load_file(path))
    if not found:
        raise UserError(f"{engine_dir}: no per-expert files (layer_*_expert_*); is this a MoE DeepSpeed checkpoint?")
    return state


def _load(path: Path):
    return load_file(path, "the checkpoint; it cannot be exported")
