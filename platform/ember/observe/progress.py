"""Progress from the training workers to the person at the terminal.

Rank 0 sends small events (dicts) through a Ray queue; the driver renders them with rich: a progress
bar plus one line every `log_every` steps. Without a queue (torchrun, tests) events print as lines.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Reporter:
    """Worker side: rank 0 emits events (and appends them to events.jsonl); other ranks stay quiet."""

    def __init__(self, queue: Any | None, is_main: bool, events_file: Path | None = None) -> None:
        self.queue = queue
        self.is_main = is_main
        self.events_file = events_file if is_main else None

    def emit(self, kind: str, **fields: Any) -> None:
        if not self.is_main:
            return
        event = {"kind": kind, "time": time.time(), **fields}
        if self.events_file is not None:
            with open(self.events_file, "a") as handle:
                handle.write(json.dumps(event) + "\n")
        if self.queue is not None:
            self.queue.put(event)
        elif kind != "step":
            print(format_event(event), flush=True)


EXTRA_LOSSES = ("aux_loss", "g_loss", "r1")  # MoE balance; GAN generator loss and R1 penalty


def format_event(event: dict[str, Any]) -> str:
    kind = event["kind"]
    if kind == "log":
        rate = (
            f"tokens/s {event['tokens_per_s']:,.0f}" if "tokens_per_s" in event
            else f"images/s {event.get('images_per_s', 0.0):,.1f}"
        )
        line = (
            f"step {event['step']:>6}/{event['total']}  loss {event['loss']:.4f}  lr {event['lr']:.2e}  "
            f"grad_norm {event['grad_norm']:.3f}  {rate}"
        )
        line += f"  mfu {100 * event['mfu']:.1f}%" if "mfu" in event else ""
        line += "".join(f"  {name} {event[name]:.4f}" for name in EXTRA_LOSSES if name in event)
        return line + (format_step_time(event) if "data_s" in event else "")
    if kind == "eval":
        line = f"step {event['step']:>6}  held-out loss {event['val_loss']:.4f} {event.get('unit', 'nats/token')}"
        return line + (f" ({event['bits_per_byte']:.4f} bits/byte)" if "bits_per_byte" in event else "")
    if kind == "checkpoint":
        if event.get("background"):
            return f"step {event['step']:>6}  checkpoint saved, committing in the background: {event['path']}"
        return f"step {event['step']:>6}  checkpoint committed: {event['path']}"
    if kind == "resume":
        return f"resuming from {event['path']} (step {event['step']})"
    if kind == "sample":
        return f"sample after {event['step']} steps:\n{event['text']}"
    if kind == "sample_grid":
        return f"step {event['step']:>6}  sample grid: {event['path']}"
    if kind == "preempted":
        return f"step {event['step']:>6}  preempted: checkpoint committed, stopping (run again to resume)"
    if kind == "skipped_checkpoint":
        return f"skipping checkpoint {event['path']}: {event['problem']}"
    if kind == "start":
        where = f"{event['world_size']} workers ({event['device']})"
        return f"training {event['total']} steps on {where}, from step {event['step']}"
    return str(event)


def format_step_time(event: dict[str, Any]) -> str:
    """Mean ms per step: data wait, forward+backward, optimizer, checkpoint stall; then peak memory."""
    parts = [("data", "data_s"), ("fwd+bwd", "forward_backward_s"), ("opt", "optimizer_s"), ("ckpt", "checkpoint_s")]
    split = " ".join(f"{label} {event[key] * 1000:.0f}" for label, key in parts)
    return f"  ms/step [{split}]  peak {event['peak_memory_gb']:.2f} GB"


class ProgressView:
    """Driver side: a rich progress bar with log lines printed above it."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._task = None

    def __enter__(self) -> ProgressView:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def note(self, line: str) -> None:
        self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def handle(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "start":
            self._task = self._progress.add_task("train", total=event["total"], completed=event["step"], status="")
        if kind == "step" and self._task is not None:
            self._progress.update(self._task, completed=event["step"], status=f"loss {event['loss']:.3f}")
            return
        if kind not in ("step", "done"):
            self._progress.console.print(format_event(event), markup=False, highlight=False, soft_wrap=True)
