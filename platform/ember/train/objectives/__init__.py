"""Objectives: turn a batch and a model output into the loss to minimise."""
