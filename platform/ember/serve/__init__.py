"""Serving and generation."""
