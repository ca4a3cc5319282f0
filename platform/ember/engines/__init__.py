"""Engines: how a model is distributed and stepped. All share the Engine interface in base.py."""

from __future__ import annotations

from ember.engines.base import Engine, build_engine, network_spec

__all__ = ["Engine", "build_engine", "network_spec"]
