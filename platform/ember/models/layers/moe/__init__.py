"""Mixture-of-Experts FFN layers, chosen by `model.moe.impl`."""

from __future__ import annotations

from ember.models.layers.moe.layer import MoEFFN, attach_expert_groups, build_moe_ffn, is_expert_parameter

__all__ = ["MoEFFN", "attach_expert_groups", "build_moe_ffn", "is_expert_parameter"]
