"""One EP=2 decode step with no Ray at all: what the MoE exchange and the serving Channel cost per step.

    python bench/serve_step.py [--steps 64] [--repeats 5]

Two torch.multiprocessing ranks on gloo load bench/serve.py's checkpoint (a GPT of d_model 192, 4 MoE
layers, 4 experts top-1) with EP=2, as two serving ranks do, and time decode steps of one sequence held
by rank 0 (rank 1 holds none but takes part in every exchange), on 1 thread each: (a) the step alone,
(b) the step plus the plans broadcast and picks gathered with torch's object collectives, (c) the same
over serve/expert_actor.py's Channel, (d) Channel plus the MoE layers' bounded exchange (one padded
all-to-all per layer instead of counts + rows: what `ember serve` runs). It also times (e) the same
sequence's steps in one process with every expert (EP=1). Medians over --repeats; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.distributed import run_on_ranks  # noqa: E402
from tests.helpers.moe_checkpoint import write_moe_checkpoint  # noqa: E402

BENCH_MODEL = {"d_model": 192, "n_heads": 6, "n_layers": 4, "seq_len": 128}  # bench/serve.py's
PROMPT = [100, 101, 102]


def _timed_steps(runner, plan_of, exchange, steps: int) -> float:
    from ember.generation.decode import Admit, StepPlan
    from ember.generation.sampling import SamplingParams

    runner.live.clear()
    exchange(plan_of(StepPlan(admit=[Admit(0, PROMPT, SamplingParams(temperature=0))])))
    started = time.perf_counter()
    for _ in range(steps):
        exchange(plan_of(StepPlan(decode=[0])))
    return 1000 * (time.perf_counter() - started) / steps


def _rank(rank: int, world_size: int, checkpoint: str, steps: int, repeats: int) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    from ember.engines.expert_groups import attach_expert_groups
    from ember.generation.decode import DecodeRunner, StepPlan
    from ember.models.layers.moe.dispatch import set_max_tokens
    from ember.serve.expert_actor import Channel
    from ember.serve.weights import load_rank_model
    from ember.world import World

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model, _ = load_rank_model(Path(checkpoint), world_size, rank, verify=False)
    attach_expert_groups(model, World(rank, world_size, 0, torch.device("cpu"), "gloo", world_size))
    group = dist.new_group(backend="gloo")
    channel = Channel(rank, world_size, group)
    runner = DecodeRunner(model)

    def mine(plan: StepPlan) -> StepPlan:
        return plan if rank == 0 else StepPlan()  # rank 0 holds the sequence

    def alone(plan: StepPlan) -> None:
        runner.step(plan)

    def objects(plan: StepPlan) -> None:
        box = [[plan, StepPlan()]]
        dist.broadcast_object_list(box, src=0, group=group)
        picked = runner.step(box[0][rank])
        dist.gather_object(picked, [None] * world_size if rank == 0 else None, dst=0, group=group)

    def channelled(plan: StepPlan) -> None:
        plans = channel.broadcast([plan, StepPlan()])
        channel.gather(runner.step(plans[rank]))

    def bounded(plan: StepPlan) -> None:
        plans = channel.broadcast([plan, StepPlan()])
        set_max_tokens(model, max(sum(len(a.prompt) for a in p.admit) + len(p.decode) for p in plans))
        channel.gather(runner.step(plans[rank]))
        set_max_tokens(model, None)

    results = {}
    cases = (("step_alone", alone), ("torch_objects", objects), ("channel", channelled), ("bounded", bounded))
    for name, exchange in cases:
        times = []
        for _ in range(repeats):
            dist.barrier()
            times.append(_timed_steps(runner, mine, exchange, steps))
        results[name] = statistics.median(times)
    return results


def _one_process(checkpoint: str, steps: int, repeats: int) -> float:
    import torch

    from ember.generation.decode import DecodeRunner
    from ember.serve.weights import load_rank_model

    torch.set_num_threads(1)
    model, _ = load_rank_model(Path(checkpoint), verify=False)
    runner = DecodeRunner(model)
    return statistics.median(_timed_steps(runner, lambda plan: plan, runner.step, steps) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from ember.checkpoint.readers import read_checkpoint_spec

    with tempfile.TemporaryDirectory(prefix="ember-bench-step-") as scratch:
        folder, _, _ = read_checkpoint_spec(write_moe_checkpoint(Path(scratch) / "run", 2, BENCH_MODEL))
        ep2 = run_on_ranks(_rank, 2, str(folder), args.steps, args.repeats)[0]
        ep1 = _one_process(str(folder), args.steps, args.repeats)
    print(f"one sequence, {args.steps} decode steps, median of {args.repeats}, ms per step:")
    print(f"  EP=1, one process:                          {ep1:6.2f}")
    print(f"  EP=2, the step alone (MoE exchanges only):  {ep2['step_alone']:6.2f}")
    print(f"  EP=2, + plans/picks as torch objects:       {ep2['torch_objects']:6.2f}")
    print(f"  EP=2, + plans/picks over Channel:           {ep2['channel']:6.2f}")
    print(f"  EP=2, + bounded MoE exchange (served):      {ep2['bounded']:6.2f}")
    print(json.dumps({"ep1_ms": round(ep1, 2), **{f"ep2_{k}_ms": round(v, 2) for k, v in ep2.items()}}))


if __name__ == "__main__":
    main()
