"""Checkpoint costs: loop stall per save (async vs sync), save throughput vs a raw write of the same bytes,
and recovery time from kill -9 of a worker to the next training step on a local Ray.

    python bench/checkpoint.py [--d-model 512] [--layers 8] [--repeats 3] [--skip-recovery]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build_engine(d_model: int, layers: int):
    from ember.engines import build_engine as build
    from ember.models import build_model
    from ember.spec import JobSpec
    from ember.world import local_world

    world = local_world()
    spec = JobSpec.from_dict({
        "name": "bench-ckpt", "data": {"train": {"urls": "unused.tar"}}, "engine": {"kind": "ddp"},
        "model": {"d_model": d_model, "n_heads": 8, "n_layers": layers, "seq_len": 64},
        "cluster": {"num_workers": 1, "device": "cpu"},
    })
    engine = build(spec, build_model(spec.model), world)
    inputs = torch.randint(0, 256, (2, 64))
    engine.backward(engine.forward(inputs).logits.float().mean())
    engine.step()  # Adam moments exist, so the checkpoint has its real size
    return engine, world


def time_saves(engine, world, root: Path, async_save: bool, repeats: int) -> tuple[list[float], list[float], int]:
    from ember.checkpoint.manager import CheckpointManager

    manager = CheckpointManager(root, world, async_save=async_save)
    stalls, totals = [], []
    for step in range(1, repeats + 1):
        started = time.perf_counter()
        stalls.append(manager.save(step, engine, {"world_size": 1}, {}).stall_s)
        manager.wait()
        totals.append(time.perf_counter() - started)
    size = sum(p.stat().st_size for p in manager.committed()[0].rglob("*") if p.is_file())
    return stalls, totals, size


def raw_write_seconds(size: int, folder: Path) -> float:
    blob = os.urandom(1 << 20) * (size // (1 << 20) + 1)
    started = time.perf_counter()
    with open(folder / "raw.bin", "wb") as handle:
        handle.write(blob[:size])
        handle.flush()
        os.fsync(handle.fileno())
    return time.perf_counter() - started


def recovery_seconds(scratch: Path) -> float:
    """kill -9 a Ray Train worker after step 9; seconds until the restarted group finishes a step."""
    import psutil

    run_dir = scratch / "recovery"
    command = [sys.executable, "-m", "ember.cli", "run", str(REPO / "jobs/debug/tiny-moe.yaml"), "--set",
               f"run_dir={run_dir}", "--set", "cluster.max_failures=1", "--set", "schedule.steps=40",
               "--set", "checkpoint.every_n_steps=5", "--set", "logging.sample_tokens=0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events = run_dir / "events.jsonl"
    while not events.exists() or '"step": 9,' not in events.read_text():
        time.sleep(0.05)
    workers = [p for p in psutil.Process(process.pid).children(recursive=True)
               if "RayTrainWorker" in " ".join(p.cmdline())]
    killed_at = time.time()
    os.kill(workers[-1].pid, signal.SIGKILL)
    process.wait(timeout=600)
    after = [json.loads(line) for line in events.read_text().splitlines()]
    resumed = next(i for i, e in enumerate(after) if e["kind"] == "resume")
    first_step = next(e for e in after[resumed:] if e["kind"] == "step")
    return first_step["time"] - killed_at


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-recovery", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine, world = build_engine(args.d_model, args.layers)
    with tempfile.TemporaryDirectory(dir=REPO) as scratch_name:  # the repo's disk, like runs/
        scratch = Path(scratch_name)
        sync_stalls, sync_totals, size = time_saves(engine, world, scratch / "sync", False, args.repeats)
        async_stalls, _, _ = time_saves(engine, world, scratch / "async", True, args.repeats)
        shutil.rmtree(scratch / "sync")
        raw = statistics.median(raw_write_seconds(size, scratch) for _ in range(args.repeats))
        recovery = None if args.skip_recovery else recovery_seconds(scratch)
    sync_stall, async_stall = statistics.median(sync_stalls), statistics.median(async_stalls)
    save_seconds = statistics.median(sync_totals)
    print(f"checkpoint size {size / 1e6:.0f} MB; sync stall {sync_stall:.3f} s, async stall {async_stall:.3f} s; "
          f"save {size / save_seconds / 1e6:.0f} MB/s vs raw write {size / raw / 1e6:.0f} MB/s; "
          f"recovery {recovery if recovery is None else round(recovery, 1)} s")
    print(json.dumps({
        "bench": "checkpoint", "checkpoint_mb": round(size / 1e6, 1),
        "sync_stall_s": round(sync_stall, 3), "async_stall_s": round(async_stall, 3),
        "async_stall_vs_sync": round(async_stall / sync_stall, 3),
        "save_throughput_vs_raw_write": round(raw / save_seconds, 3),
        "recovery_s": None if recovery is None else round(recovery, 1),
    }))


if __name__ == "__main__":
    main()
