"""Training: the rank-local loop, objectives per family, and the Ray Train launch."""
