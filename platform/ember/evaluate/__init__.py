"""Sample quality: `ember eval RUN_DIR` (Frechet distance and class accuracy in a digits classifier's space)."""
