"""Is the data ever the bottleneck? The data-wait share of a step on the quickstart and the diffusion job.

    python bench/data_wait.py [--quickstart-steps 300] [--diffusion-steps 300] [--only JOB] [--set JOB:KEY=VALUE]

Each job runs through `ember run` (embedded Ray, its own workers and shard stream) in a scratch run_dir.
Rank 0's step-time split (observe/step_time.py: data wait, forward+backward, optimizer, checkpoint stall,
the per-step means of every logging window, also in TensorBoard under time/) is read back from the run's
events.jsonl. Reported per job: the data-wait share of the summed step time over all windows, and over the
windows after the first (the stream's start-up: opening shards, filling the shuffle buffer). Goal (issue 17):
under 2 %. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("data_s", "forward_backward_s", "optimizer_s", "checkpoint_s")
GOAL = 0.02
JOBS = {"quickstart": "jobs/quickstart.yaml", "diffusion": "jobs/diffusion-digits.yaml"}


def run_job(spec: str, steps: int, run_dir: Path, extra: list[str]) -> list[dict]:
    sets = [f"run_dir={run_dir}", f"schedule.steps={steps}", "checkpoint.resume=never", "logging.log_every=20", *extra]
    command = [sys.executable, "-m", "ember.cli", "run", str(REPO / spec), *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [event for event in events if event["kind"] == "log" and "data_s" in event]


def share(windows: list[dict]) -> float:
    data = sum(window["data_s"] for window in windows)
    return data / max(sum(window[phase] for window in windows for phase in PHASES), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart-steps", type=int, default=300)
    parser.add_argument("--diffusion-steps", type=int, default=300)
    parser.add_argument("--only", choices=sorted(JOBS), help="Run one job only.")
    parser.add_argument("--set", action="append", default=[], help="JOB:KEY=VALUE, a spec override for one job.")
    args = parser.parse_args()
    steps = {"quickstart": args.quickstart_steps, "diffusion": args.diffusion_steps}
    result: dict[str, object] = {"bench": "data_wait", "goal_share": GOAL}
    with tempfile.TemporaryDirectory(prefix="ember-data-wait-") as scratch:
        for name, spec in JOBS.items():
            if args.only not in (None, name):
                continue
            extra = [item.split(":", 1)[1] for item in args.set if item.split(":", 1)[0] == name]
            windows = run_job(spec, steps[name], Path(scratch) / name, extra)
            whole, steady = share(windows), share(windows[1:])
            mean_data_ms = 1000 * sum(w["data_s"] for w in windows[1:]) / max(len(windows) - 1, 1)
            print(f"{name:10s} {steps[name]} steps, {len(windows)} windows: data wait {whole:.2%} of step time "
                  f"({steady:.2%} after the first window; {mean_data_ms:.2f} ms per step)")
            result[name] = {"steps": steps[name], "overrides": extra, "share": round(whole, 4),
                            "share_after_first_window": round(steady, 4), "data_ms_per_step": round(mean_data_ms, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
