"""TensorBoard writer that only the main rank opens; other ranks get a no-op."""

from __future__ import annotations

from pathlib import Path

import torch


class TensorBoardLogger:
    def __init__(self, folder: Path | None, enabled: bool) -> None:
        self._writer = None
        if enabled and folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(f"{prefix}{name}", value, global_step=step)

    def histogram(self, step: int, name: str, values: torch.Tensor) -> None:
        if self._writer is not None:
            self._writer.add_histogram(name, values.detach().float().cpu(), global_step=step)

    def bars(self, step: int, name: str, heights: torch.Tensor) -> None:
        """A histogram whose bucket i is heights[i]: TensorBoard draws a value per index (e.g. load per expert)."""
        if self._writer is None:
            return
        heights = heights.detach().double().cpu()
        index = torch.arange(heights.numel(), dtype=torch.float64)
        self._writer.add_histogram_raw(
            name, min=0.0, max=float(heights.numel() - 1), num=float(heights.sum()), sum=float((index * heights).sum()),
            sum_squares=float((index.square() * heights).sum()), bucket_limits=(index + 0.5).tolist(),
            bucket_counts=heights.tolist(), global_step=step,
        )

    def image(self, step: int, name: str, grid) -> None:
        """A uint8 [H, W, C] picture (a sample grid)."""
        if self._writer is not None:
            self._writer.add_image(name, grid, global_step=step, dataformats="HWC")

    def text(self, step: int, name: str, value: str) -> None:
        if self._writer is not None:
            self._writer.add_text(name, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one scalar tag from the event files in `folder` (tests, moe-stats)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags().get("scalars", []):
        return []
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]
