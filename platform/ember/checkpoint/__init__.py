"""Checkpoints: atomic commit with a verified manifest, resume, export."""

from ember.checkpoint.manager import CheckpointManager, find_checkpoint

__all__ = ["CheckpointManager", "find_checkpoint"]
