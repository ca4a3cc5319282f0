"""Mixture-of-Experts FFN layers, chosen by `model.moe.impl`: ember's own (router.py, dispatch.py, experts.py,
layer.py) or DeepSpeed's; deepspeed_compat.py holds what DeepSpeed's engine and checkpoints need."""

from __future__ import annotations

from ember.models.layers.moe.deepspeed_compat import attach_expert_groups, expose_to_deepspeed
from ember.models.layers.moe.layer import EmberMoE, MoEFFN, build_moe_ffn, is_expert_parameter

__all__ = ["EmberMoE", "MoEFFN", "attach_expert_groups", "build_moe_ffn", "expose_to_deepspeed", "is_expert_parameter"]
