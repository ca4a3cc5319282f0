"""Expert parallelism over gloo: training step time of ember's MoE GPT with EP=2 vs EP=1, and the all-to-all share.

    python bench/moe_ep.py [--steps 10] [--warmup 3] [--experts 16] [--top-k 1]
    python bench/moe_ep.py --quickstart    ember's layer vs DeepSpeed's on the quickstart's model, both EP=2

Two gloo ranks on CPU (one thread each), DeepSpeed ZeRO-2, spawned once. EP=1: every rank holds all experts
and ZeRO reduces their gradients over both ranks; EP=2: each rank holds half and tokens travel by
all-to-all. Both engines live in the same two processes and take turns, one step each per round, so load
drift hits both alike; the table reports median steps after the warm-up. The all-to-all share is the time
inside the dispatcher's exchanges (profiler label ember.moe.all_to_all, forward and backward) over one
profiled EP=2 step. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
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
MODEL = {"d_model": 256, "n_heads": 4, "n_layers": 2, "seq_len": 128, "d_ff": 1024}
MICRO_BATCH = 16
SEQ_LEN = MODEL["seq_len"]
# jobs/quickstart.yaml's model and MoE section (seq_len 128, micro-batch 16 as above)
QUICKSTART_MODEL = {"d_model": 192, "n_heads": 6, "n_layers": 4, "seq_len": 128}
QUICKSTART_MOE = {"num_experts": 4, "top_k": 1, "every_n_layers": 2, "ep_size": 2, "capacity_factor": 1.25}


def variants(args) -> dict[str, tuple[dict, dict]]:
    """name -> (model, moe) of the engines compared side by side."""
    if args.quickstart:
        return {impl: (QUICKSTART_MODEL, {**QUICKSTART_MOE, "impl": impl}) for impl in ("deepspeed", "ember")}
    moe = {"num_experts": args.experts, "top_k": args.top_k, "every_n_layers": 1, "drop_tokens": False,
           "impl": "ember"}
    return {f"ep{size}": (MODEL, {**moe, "ep_size": size}) for size in (1, 2)}


def job_spec(model: dict, moe: dict, args):
    from ember.spec import JobSpec

    return JobSpec.from_dict({
        "name": f"bench-moe-ep{moe['ep_size']}-{moe['impl']}",
        "model": {**model, "moe": moe},
        "data": {"train": {"urls": "unused-the-bench-feeds-batches"}},
        "engine": {"kind": "deepspeed", "zero_stage": 2},
        "optim": {"name": "adamw", "lr": 1e-3, "warmup_steps": 2},
        "schedule": {"steps": args.steps + args.warmup + 1, "micro_batch": MICRO_BATCH},
        "cluster": {"num_workers": WORLD_SIZE, "device": "cpu"},
    })


def build(model: dict, moe: dict, args):
    from ember.engines import build_engine
    from ember.models import build_model
    from ember.world import world_from_env

    spec = job_spec(model, moe, args)
    world = world_from_env("cpu", ep_size=moe["ep_size"])
    torch.manual_seed(0)
    return build_engine(spec, build_model(spec.model, world.expert_placement(spec.model), seed=0), world)


def text_rows(rank: int, step: int) -> torch.Tensor:
    import inspect

    tokens = torch.frombuffer(bytearray(Path(inspect.__file__).read_bytes()), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(1000 * rank + step)
    starts = torch.randint(0, len(tokens) - SEQ_LEN - 1, (MICRO_BATCH,), generator=generator)
    return torch.stack([tokens[s : s + SEQ_LEN + 1] for s in starts.tolist()])


def timed_step(engine, rows: torch.Tensor) -> float:
    from ember.train.objectives.lm import lm_loss, split_batch

    started = time.perf_counter()
    inputs, targets = split_batch(rows)
    loss, _ = lm_loss(engine.forward(inputs), targets, 0.01)
    engine.backward(loss)
    engine.step()
    dist.barrier()  # a step is done when the slowest rank is done
    return time.perf_counter() - started


def all_to_all_share(engine, rows: torch.Tensor) -> float:
    from ember.models.layers.moe.dispatch import ALL_TO_ALL

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        elapsed = timed_step(engine, rows)
    exchange_us = sum(event.cpu_time_total for event in profile.events() if event.name == ALL_TO_ALL)
    return exchange_us / 1e6 / elapsed


def bench_rank(rank: int, world_size: int, args) -> dict:
    import warnings

    torch.set_num_threads(1)  # one core per rank
    warnings.simplefilter("ignore")
    engines = {name: build(model, moe, args) for name, (model, moe) in variants(args).items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for step in range(args.warmup + args.steps):
        for name, engine in engines.items():
            elapsed = timed_step(engine, text_rows(rank, step))
            if step >= args.warmup:
                times[name].append(elapsed)
    shares = {name: all_to_all_share(engine, text_rows(rank, 10_000)) for name, engine in engines.items()
              if variants(args)[name][1]["impl"] == "ember" and variants(args)[name][1]["ep_size"] > 1}
    return {"times": times, "share": shares}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per EP size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--quickstart", action="store_true", help="ember vs deepspeed impl on the quickstart model")
    args = parser.parse_args()
    ranks = run_on_ranks(bench_rank, WORLD_SIZE, args)
    median = {name: statistics.median(values) for name, values in ranks[0]["times"].items()}
    share = statistics.mean(rank["share"]["ember" if args.quickstart else "ep2"] for rank in ranks)
    tokens = MICRO_BATCH * SEQ_LEN
    print(f"{'engine':<10}{'median step (ms)':>18}{'tokens/s per rank':>20}")
    for name, value in median.items():
        print(f"{name:<10}{value * 1e3:>18.1f}{tokens / value:>20.0f}")
    print(f"all-to-all share of an EP=2 step (ember): {share:.1%}")
    if args.quickstart:
        print(json.dumps({
            "bench": "moe_ep_quickstart",
            "ember_vs_deepspeed_tokens_per_s": round(median["deepspeed"] / median["ember"], 3),
            "all_to_all_share_ember": round(share, 3),
            "step_ms": {name: round(value * 1e3, 1) for name, value in median.items()},
            "world_size": WORLD_SIZE, "backend": "gloo", "engine": "deepspeed zero2", "model": QUICKSTART_MODEL,
            "moe": QUICKSTART_MOE, "tokens_per_rank_step": tokens, "steps": args.steps,
        }))
        return
    print(json.dumps({
        "bench": "moe_ep",
        "ep2_vs_ep1_step_time": round(median["ep2"] / median["ep1"], 3),
        "all_to_all_share_ep2": round(share, 3),
        "step_ms": {name: round(value * 1e3, 1) for name, value in median.items()},
        "world_size": WORLD_SIZE, "backend": "gloo", "engine": "deepspeed zero2", "model": MODEL,
        "experts": args.experts, "top_k": args.top_k, "tokens_per_rank_step": tokens, "steps": args.steps,
    }))


if __name__ == "__main__":
    main()
