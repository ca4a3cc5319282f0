"""Where a step's time goes (data wait, forward+backward, optimizer, checkpoint stall) and peak memory."""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

PHASES = ("data_s", "forward_backward_s", "optimizer_s", "checkpoint_s")


class StepClock:
    """Accumulates seconds per phase over a logging window; `window()` gives the per-step means and resets."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0

    def timed(self, phase: str, call: Callable[..., Any]) -> Callable[..., Any]:
        """`call`, with the time spent inside it added to `phase`."""

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        return timed_call

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def end_step(self, step_seconds: float) -> None:
        """One optimizer step of `step_seconds` ended; what data and optimizer did not take was forward+backward."""
        self.steps += 1
        self.seconds["step_s"] += step_seconds

    def window(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        inside = self.seconds["step_s"] - self.seconds["data_s"] - self.seconds["optimizer_s"]
        means = {phase: self.seconds[phase] / steps for phase in PHASES if phase != "forward_backward_s"}
        means["forward_backward_s"] = max(inside, 0.0) / steps
        self.seconds.clear()
        self.steps = 0
        return {phase: means[phase] for phase in PHASES}


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA's max_memory_allocated on a GPU, the peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
