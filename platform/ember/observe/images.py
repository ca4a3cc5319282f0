"""Images in [-1, 1] as pictures: sample grids (TensorBoard, PNG files) and single PNGs (`ember serve`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

TILE = 32  # pixels per image in a grid; 8x8 digits are scaled up (nearest) to stay legible


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Values in [-1, 1] -> uint8 0..255 on the CPU, same shape."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_picture(pixels: np.ndarray) -> Image.Image:
    """uint8 [H, W, C] with C 1 (grey) or 3 -> a PIL image."""
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def image_grid(images: torch.Tensor, columns: int, tile: int = TILE, gap: int = 2) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [rows * (tile + gap), columns * (tile + gap), C], row-major."""
    images = to_pixels(images)
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
    to_picture(grid).save(path)
