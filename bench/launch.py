"""Ray Train vs plain torchrun on the same job: time to first step and steady-state step time.

    python bench/launch.py [--steps 60] [--rounds 2]

Both launchers run the same worker code (ember.train.loop) on the same spec; timings come from the
events.jsonl that rank 0 writes. Rounds alternate the launchers so drift on a shared machine hits both.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "jobs" / "quickstart.yaml"


def overrides(run_dir: Path, steps: int) -> list[str]:
    items = [
        f"run_dir={run_dir}", f"schedule.steps={steps}", "schedule.eval_every=100000", "logging.sample_tokens=0",
        "checkpoint.every_n_steps=100000", "checkpoint.resume=never", "model.moe=null", "engine.zero_stage=2",
    ]
    return [part for item in items for part in ("--set", item)]


def launch(kind: str, run_dir: Path, steps: int) -> dict[str, float]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    if kind == "ray":
        command = [sys.executable, "-m", "ember.cli", "run", str(SPEC)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                   "-m", "ember.train.torchrun", str(SPEC)]
    started = time.time()
    subprocess.run(command + overrides(run_dir, steps), check=True, env=env, capture_output=True, timeout=900)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    step_times = [e["time"] for e in events if e["kind"] == "step"]
    diffs = [b - a for a, b in itertools.pairwise(step_times)][10:]  # skip warm-up steps
    return {"first_step_s": step_times[0] - started, "step_s": statistics.median(diffs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from ember.data.build import ensure_shards
    from ember.spec import JobSpec

    ensure_shards(JobSpec.load(SPEC).data)  # what `ember run` of the quickstart would build, before any timing
    results: dict[str, list[dict[str, float]]] = {"ray": [], "torchrun": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for kind in ("torchrun", "ray") if round_index % 2 == 0 else ("ray", "torchrun"):
                measured = launch(kind, Path(scratch) / f"{kind}-{round_index}", args.steps)
                results[kind].append(measured)
                print(f"{kind:9s} round {round_index}: first step {measured['first_step_s']:.1f} s, "
                      f"step {measured['step_s'] * 1000:.0f} ms", flush=True)
    ray_step = statistics.median(r["step_s"] for r in results["ray"])
    torchrun_step = statistics.median(r["step_s"] for r in results["torchrun"])
    summary = {
        "bench": "launch",
        "model": "quickstart GPT, dense, DeepSpeed ZeRO-2, 2 CPU workers",
        "ray_first_step_s": round(statistics.median(r["first_step_s"] for r in results["ray"]), 2),
        "torchrun_first_step_s": round(statistics.median(r["first_step_s"] for r in results["torchrun"]), 2),
        "ray_step_ms": round(ray_step * 1000, 1),
        "torchrun_step_ms": round(torchrun_step * 1000, 1),
        "ray_steady_throughput_vs_torchrun": round(torchrun_step / ray_step, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
