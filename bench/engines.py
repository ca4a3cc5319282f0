"""Steady-state step time of every engine on the same GPT and data, as a ratio to DDP.

    python bench/engines.py [--steps 20] [--warmup 5]

Two gloo ranks on CPU, spawned once; all engines live in the same two processes and take turns, one
step each per round, so start-up and imports are not timed and load drift hits every engine alike.
A step is forward + backward + optimizer step on real text (bytes of Python standard-library
sources); ranks meet at a barrier after each step, and the table reports the median step after the
warm-up rounds. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers: the same rank spawner the distributed tests use

from tests.helpers.distributed import run_on_ranks  # noqa: E402

WORLD_SIZE = 2
MODEL = {"d_model": 128, "n_heads": 4, "n_layers": 4, "seq_len": 128}
MICRO_BATCH = 8
ENGINES = {
    "ddp": {"kind": "ddp"},
    **{f"deepspeed_zero{stage}": {"kind": "deepspeed", "zero_stage": stage} for stage in range(4)},
    "fsdp2": {"kind": "fsdp"},
    "fairscale_sharded_ddp": {"kind": "fairscale", "mode": "sharded_ddp"},
}


def job_spec(engine: dict, steps: int):
    from ember.spec import JobSpec

    return JobSpec.from_dict(
        {
            "name": "bench-engines",
            "model": MODEL,
            "data": {"train": {"urls": "unused-the-bench-feeds-batches"}},
            "engine": engine,
            "optim": {"name": "adamw", "lr": 1e-3, "warmup_steps": 2},
            "schedule": {"steps": steps, "micro_batch": MICRO_BATCH},
            "cluster": {"num_workers": WORLD_SIZE, "device": "cpu"},
        }
    )


def text_batches(rank: int, count: int) -> list[torch.Tensor]:
    """`count` batches of [micro_batch, seq_len + 1] windows of stdlib source bytes, different per rank."""
    data = b"".join(Path(module.__file__).read_bytes() for module in (inspect, json, argparse, statistics))
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(rank)
    width = MODEL["seq_len"] + 1
    starts = torch.randint(0, len(tokens) - width, (count, MICRO_BATCH), generator=generator)
    return [torch.stack([tokens[s : s + width] for s in row.tolist()]) for row in starts]


def build(engine_spec: dict, steps: int):
    from ember.engines import build_engine
    from ember.models import build_model
    from ember.world import world_from_env

    spec = job_spec(engine_spec, steps)
    torch.manual_seed(0)
    return build_engine(spec, build_model(spec.model, seed=0), world_from_env("cpu"))


def timed_step(engine, rows: torch.Tensor) -> float:
    from ember.train.objectives.lm import lm_loss, split_batch

    started = time.perf_counter()
    inputs, targets = split_batch(rows)
    loss, _ = lm_loss(engine.forward(inputs), targets, 0.0)
    engine.backward(loss)
    engine.step()
    dist.barrier()  # a step is done when the slowest rank is done
    return time.perf_counter() - started


def bench_rank(rank: int, world_size: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Step every engine once per round, so drift in machine load spreads over all of them alike."""
    import warnings

    torch.set_num_threads(1)  # one core per rank
    warnings.simplefilter("ignore", FutureWarning)
    engines = {name: build(engine, steps + warmup) for name, engine in ENGINES.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for round_index, rows in enumerate(text_batches(rank, steps + warmup)):
        for name, engine in engines.items():
            elapsed = timed_step(engine, rows)
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per engine")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocation, lazy init)")
    args = parser.parse_args()
    times = run_on_ranks(bench_rank, WORLD_SIZE, args.steps, args.warmup)[0]
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{'engine':<24}{'median step (ms)':>18}{'min (ms)':>12}{'vs ddp':>9}")
    for name, value in median.items():
        print(f"{name:<24}{value * 1e3:>18.1f}{min(times[name]) * 1e3:>12.1f}{value / median['ddp']:>9.2f}")
    print(
        json.dumps(
            {
                "bench": "engines",
                "step_time_ratio_vs_ddp": {name: round(value / median["ddp"], 3) for name, value in median.items()},
                "step_time_ms": {name: round(value * 1e3, 2) for name, value in median.items()},
                "world_size": WORLD_SIZE,
                "device": "cpu",
                "backend": "gloo",
                "model": MODEL,
                "micro_batch": MICRO_BATCH,
                "steps": args.steps,
                "warmup": args.warmup,
            }
        )
    )


if __name__ == "__main__":
    main()
