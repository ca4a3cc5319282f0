"""Sample grids: a batch of images in [-1, 1] laid out as one uint8 picture (TensorBoard, PNG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

TILE = 32  # pixels per image in a grid; 8x8 digits are scaled up (nearest) to stay legible


def image_grid(images: torch.Tensor, columns: int, tile: int = TILE, gap: int = 2) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [rows * (tile + gap), columns * (tile + gap), C], row-major."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    batch, channels, height, _ = images.shape
    scale = max(1, tile // height)
    images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    size = height * scale + gap
    rows = (batch + columns - 1) // columns
    grid = np.full((rows * size, columns * size, channels), 255, dtype=np.uint8)
    for index, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        top, left = (index // columns) * size, (index % columns) * size
        grid[top : top + size - gap, left : left + size - gap] = image
    return grid


def save_png(grid: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
