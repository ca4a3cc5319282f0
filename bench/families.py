"""Training images/s of the image families (diffusion, GAN) with DeepSpeed vs DDP, and DDIM sampling images/s.

    python bench/families.py [--steps 10] [--warmup 3]

Two gloo ranks on CPU, spawned once; every (family, engine) objective lives in the same two processes and
they take turns, one optimizer step each per round, so load drift hits them alike. Batches are real
digits (the train split, 8x8). The models are the example jobs' (jobs/diffusion-digits.yaml,
jobs/gan-digits.yaml). DDIM sampling (50 steps, guidance 1 and 2) runs on rank 0 with the EMA U-Net.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers: the same rank spawner the distributed tests use

from tests.helpers.distributed import run_on_ranks  # noqa: E402

ENGINES = {"ddp": ["engine={kind: ddp}"], "deepspeed_zero1": ["engine={kind: deepspeed, zero_stage: 1}"]}
JOBS = {"diffusion": "diffusion-digits", "gan": "gan-digits"}


def job_spec(family: str, engine: list[str]):
    from ember.spec import JobSpec

    overrides = [*engine, "cluster.num_workers=2", "data.build=null", "checkpoint.async_save=false"]
    return JobSpec.load(REPO / "jobs" / f"{JOBS[family]}.yaml", overrides)


def digit_batches(rank: int, micro_batch: int, count: int):
    from ember.data.formats import ImageBatch
    from ember.evaluate.classifier import digit_split

    (images, labels), _ = digit_split(8)
    generator = torch.Generator().manual_seed(rank)
    picks = [torch.randint(0, len(images), (micro_batch,), generator=generator) for _ in range(count)]
    return [ImageBatch(images[p], labels[p], [None] * micro_batch) for p in picks]


def rank_main(rank: int, world_size: int, steps: int, warmup: int) -> dict:
    from ember.train.objectives.base import build_objective
    from ember.world import world_from_env

    torch.set_num_threads(1)
    world = world_from_env("cpu")
    runs = {}
    for family in JOBS:
        for engine, overrides in ENGINES.items():
            spec = job_spec(family, overrides)
            torch.manual_seed(0)
            batches = iter(digit_batches(rank, spec.schedule.micro_batch, steps + warmup))
            runs[(family, engine)] = (spec, build_objective(spec, world), batches)
    times: dict[str, list[float]] = {f"{f}/{e}": [] for f, e in runs}
    for step in range(steps + warmup):
        for (family, engine), (_, objective, batches) in runs.items():
            world.barrier()
            started = time.perf_counter()
            objective.train_step(lambda b=batches: next(b), step)
            world.barrier()
            if step >= warmup:
                times[f"{family}/{engine}"].append(time.perf_counter() - started)
    result = {name: 2 * runs[tuple(name.split("/"))][0].schedule.micro_batch / statistics.median(values)
              for name, values in times.items()}
    if rank == 0:
        diffusion = runs[("diffusion", "ddp")][1]
        for scale in (1.0, 2.0):
            started = time.perf_counter()
            diffusion.generate(torch.arange(100) % 10, 100, seed=0, guidance=scale, steps=50)
            result[f"ddim50_guidance{scale:g}"] = 100 / (time.perf_counter() - started)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    result = run_on_ranks(rank_main, 2, args.steps, args.warmup)[0]
    print("| what | images/s | vs DDP |\n| --- | --- | --- |")
    for family in JOBS:
        ddp = result[f"{family}/ddp"]
        for engine in ENGINES:
            value = result[f"{family}/{engine}"]
            print(f"| {family} training, {engine} (2 ranks) | {value:.1f} | {value / ddp:.2f} |")
    for scale in (1, 2):
        print(f"| DDIM 50 steps, guidance {scale} (1 rank) | {result[f'ddim50_guidance{scale}']:.1f} | |")
    print(json.dumps({key: round(value, 2) for key, value in result.items()}))


if __name__ == "__main__":
    main()
