"""Plain torch.nn models; no distributed code inside a model."""

from __future__ import annotations

from ember.models.gpt import GPT, ModelOutput, build_model

__all__ = ["GPT", "ModelOutput", "build_model"]
