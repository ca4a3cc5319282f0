"""DeepSpeed: the engine (engine.py), its checkpoint files (layout.py) and their online reshard (reshard.py),
and what its engine needs from ember's MoE layers (moe.py)."""

from __future__ import annotations

from ember.engines.deepspeed.engine import DeepSpeedEngine, build_deepspeed_engine, deepspeed_config

__all__ = ["DeepSpeedEngine", "build_deepspeed_engine", "deepspeed_config"]
