"""The step-time split adds up to the step, and the progress line shows it."""

from __future__ import annotations

import time

import torch

from ember.observe.progress import format_event
from ember.observe.step_time import PHASES, StepClock, peak_memory_gb


def test_the_split_adds_up_to_the_measured_step() -> None:
    clock = StepClock()
    fetch = clock.timed("data_s", lambda: time.sleep(0.02))
    optimize = clock.timed("optimizer_s", lambda: time.sleep(0.01))
    total = 0.0
    for _ in range(2):
        start = time.perf_counter()
        fetch()
        time.sleep(0.03)  # forward+backward
        optimize()
        elapsed = time.perf_counter() - start
        clock.end_step(elapsed)
        total += elapsed
    clock.add("checkpoint_s", 0.1)
    split = clock.window()
    assert tuple(split) == PHASES
    assert split["data_s"] >= 0.02  # sleeps only ever overshoot
    assert split["optimizer_s"] >= 0.01
    assert split["forward_backward_s"] >= 0.03
    inside = split["data_s"] + split["forward_backward_s"] + split["optimizer_s"]
    assert abs(inside - total / 2) < 1e-3  # the three phases partition the step
    assert split["checkpoint_s"] == 0.05  # per step of the window
    assert clock.window() == dict.fromkeys(PHASES, 0.0)  # a window starts empty


def test_peak_memory_on_cpu_grows_with_an_allocation() -> None:
    before = peak_memory_gb(torch.device("cpu"))
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    after = peak_memory_gb(torch.device("cpu"))
    assert block.sum() > 0
    assert after >= before
    assert after > 0.05


def test_the_progress_line_shows_the_split_and_peak_memory() -> None:
    event = {"kind": "log", "step": 5, "total": 10, "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0,
             "data_s": 0.002, "forward_backward_s": 0.030, "optimizer_s": 0.005, "checkpoint_s": 0.0,
             "peak_memory_gb": 1.25}
    assert "ms/step [data 2 fwd+bwd 30 opt 5 ckpt 0]  peak 1.25 GB" in format_event(event)
