"""The two state layouts of a MoE layer's experts, and the conversion between them.

ember's layer stacks its experts (`experts.w_in` [E_local, d, d_ff], ...) and names its gate
`router.gate.weight`; DeepSpeed's layer keeps one MLP per expert (`PER_EXPERT`) and names its gate
`deepspeed_moe.gate.wg.weight`. Either layout loads into either impl (load hooks), so checkpoints and
exports of one impl load into the other.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ember.models.layers.moe.experts import stack_experts, unstack_experts

PER_EXPERT = "deepspeed_moe.experts.deepspeed_experts.{}."  # + fc.weight, fc.bias, proj.weight, proj.bias
DEEPSPEED_GATE = "deepspeed_moe.gate.wg.weight"
EMBER_GATE = "router.gate.weight"
STACKED = ("w_in", "b_in", "w_out", "b_out")  # under "experts."
PER_EXPERT_KEY = re.compile(r"^deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.+)$")
EXPERT_NAME = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..+)$")  # (layer prefix, expert id, parameter)


def to_per_expert_layout(state: dict[str, Any], prefix: str, num_local: int, keep_vars: bool = False) -> None:
    """In place, when `state` holds ember's layout under `prefix`: one entry per local expert and parameter,
    and the gate under DeepSpeed's name."""
    if prefix + EMBER_GATE in state:
        state[prefix + DEEPSPEED_GATE] = state.pop(prefix + EMBER_GATE)
    if prefix + "experts.w_in" not in state:
        return
    stacked = {name: state.pop(f"{prefix}experts.{name}") for name in STACKED}
    for local, tensors in enumerate(unstack_experts(stacked, num_local)):
        for name, tensor in tensors.items():
            # Cloned: a view would drag the whole stacked storage into every saved expert file.
            state[prefix + PER_EXPERT.format(local) + name] = tensor if keep_vars else tensor.clone()


def from_per_expert_layout(state: dict[str, Any], prefix: str, num_local: int) -> None:
    """In place, when `state` holds DeepSpeed's layout under `prefix`: back to ember's stacked layout."""
    if prefix + DEEPSPEED_GATE in state:
        state[prefix + EMBER_GATE] = state.pop(prefix + DEEPSPEED_GATE)
    per_expert: dict[int, dict[str, torch.Tensor]] = {}
    for key in [k for k in state if k.startswith(prefix)]:
        match = PER_EXPERT_KEY.match(key[len(prefix):])
        if match:
            per_expert.setdefault(int(match.group(1)), {})[match.group(2)] = state.pop(key)
    if not per_expert:
        return
    if sorted(per_expert) != list(range(num_local)):
        raise KeyError(f"{prefix}: the state holds experts {sorted(per_expert)}, this layer has {num_local}")
    stacked = stack_experts([per_expert[local] for local in range(num_local)])
    state.update({f"{prefix}experts.{name}": tensor for name, tensor in stacked.items()})
