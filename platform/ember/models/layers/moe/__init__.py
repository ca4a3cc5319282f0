"""Mixture-of-Experts FFN layers, chosen by `model.moe.impl`: ember's own (router.py, dispatch.py, experts.py,
layer.py) or DeepSpeed's (deepspeed_layer.py); layouts.py converts between their state layouts. Plain torch:
the expert-parallel group is handed to a layer (`EmberMoE.use_expert_group`), never set up here."""

from __future__ import annotations

from ember.models.layers.moe.layer import EmberMoE, MoEFFN, build_moe_ffn, is_expert_parameter

__all__ = ["EmberMoE", "MoEFFN", "build_moe_ffn", "is_expert_parameter"]
