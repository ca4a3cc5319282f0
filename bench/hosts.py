"""ember on namespaced hosts (tests/hosts/harness.py): an EP=2 step with its ranks on two hosts vs one host, and
how long losing a host stops training.

    PYTHONPATH=platform python bench/hosts.py [--steps 20] [--warmup 3] [--rounds 3]     (as root: namespaces)

1. EP=2 MoE step: bench/moe_ep.py's EP=2 engine (its model, 16 experts, ember's dispatcher, DeepSpeed ZeRO-2,
   gloo, one thread per rank) in two ranks started on host1 and host2, so every all-to-all crosses the hosts'
   veth pairs and bridge, and in two ranks both on host1; the two placements alternate round by round (fresh
   processes each round), so load drift hits both alike. Median step after the warm-up, and the all-to-all
   share (profiler label ember.moe.all_to_all) of one profiled step. The "network" is the kernel's veth and
   bridge on one machine: this measures the stack across hosts (TCP between namespaces instead of within one),
   not a physical link.
2. Host loss to the next training step: Ray's head on host1 (`ember up --ip`), host2 joined with the token, the
   tiny-moe job of tests/hosts (EP=2, one rank per host, checkpoint every 20 steps) submitted from a laptop
   host. While host2's rank is paused at the end of step 25 (checkpoint/fault.py; step 20 committed), every
   process of host2 gets SIGKILL at once; a fresh host3 joins with the token at once (a replacement machine
   running `ember up --join`), and the clock stops at rank 0's first training step after the resume (step 21,
   events.jsonl). Printed with where the time goes.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.hosts: the harness and the helpers the hosts tier uses

from tests.helpers.runs import events  # noqa: E402
from tests.hosts.conftest import (  # noqa: E402
    EVERY,
    PAUSE_STEP,
    follow_from_laptop,
    made_hosts,
    start_ray_hosts,
    submit_job,
    wait_for,
)
from tests.hosts.harness import HostCluster, check_namespaces_available  # noqa: E402

import moe_ep  # noqa: E402  (bench/, beside this file)

PLACEMENTS = {"two hosts": ("host1", "host2"), "one host": ("host1", "host1")}
PORT = 29650


def rank_main(args: argparse.Namespace) -> None:
    """One rank of the EP=2 step bench (run inside a host): times its steps and prints them as JSON."""
    import torch

    os.environ.update(RANK=str(args.rank), WORLD_SIZE="2", LOCAL_RANK=str(args.local_rank), MASTER_ADDR=args.master,
                      MASTER_PORT=str(args.port), GLOO_SOCKET_IFNAME="eth0")  # the host's own address, not lo
    torch.set_num_threads(1)
    options = argparse.Namespace(steps=args.steps, warmup=args.warmup, experts=16, top_k=1, quickstart=False)
    model, moe = moe_ep.variants(options)["ep2"]
    engine = moe_ep.build(model, moe, options)
    times = [moe_ep.timed_step(engine, moe_ep.text_rows(args.rank, step)) for step in range(args.warmup + args.steps)]
    share = moe_ep.all_to_all_share(engine, moe_ep.text_rows(args.rank, 10_000))
    print(json.dumps({"times": times[args.warmup:], "share": share}))


def ep_round(hosts: HostCluster, placement: tuple[str, str], port: int, args: argparse.Namespace) -> dict:
    """Both ranks of one placement, started together; rank 0's step times and the ranks' mean share."""
    master = hosts.hosts[placement[0]].ip
    processes = []
    for rank, name in enumerate(placement):
        local_rank = placement[:rank].count(name)
        argv = [sys.executable, str(Path(__file__)), "rank", "--rank", str(rank), "--local-rank", str(local_rank),
                "--master", master, "--port", str(port), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        processes.append(hosts.hosts[name].popen(argv, cwd=str(REPO), stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True))
    results = []
    for process in processes:
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"a rank failed ({process.returncode}): {output[-2000:]}"
        results.append(json.loads([line for line in output.splitlines() if line.startswith("{")][-1]))
    return {"times": results[0]["times"], "share": statistics.mean(result["share"] for result in results)}


def bench_ep_step(hosts: HostCluster, args: argparse.Namespace) -> dict:
    times: dict[str, list[float]] = {name: [] for name in PLACEMENTS}
    shares: dict[str, list[float]] = {name: [] for name in PLACEMENTS}
    for round_number in range(args.rounds):
        for index, (name, placement) in enumerate(PLACEMENTS.items()):
            result = ep_round(hosts, placement, PORT + 2 * round_number + index, args)
            times[name] += result["times"]
            shares[name].append(result["share"])
    return {name: {"step_ms": round(statistics.median(times[name]) * 1e3, 1),
                   "all_to_all_share": round(statistics.mean(shares[name]), 3)} for name in PLACEMENTS}


def bench_host_loss(hosts: HostCluster) -> dict:
    """Seconds from host2's SIGKILL to host3 joined, to the resume (checkpoint loaded), to the first step."""
    from ember.data.build import build_text_shards

    shards = hosts.shared_dir / "shards"
    build_text_shards(shards, train_shards=4, max_bytes=2_000_000)  # as tests/conftest.py's text_shards
    ray_hosts = start_ray_hosts(hosts)
    host2, run_dir = ray_hosts.workers[-1], hosts.shared_dir / "runs/host-loss"
    paused = ray_hosts.arm_pause(host2)
    job = submit_job(ray_hosts, run_dir, shards)
    wait_for(paused)
    wait_for(run_dir / "checkpoints" / f"step_{EVERY:06d}" / "manifest.json")
    lost = time.time()
    ray_hosts.workers.remove(host2)
    hosts.remove_host(host2.name)
    ray_hosts.join(hosts.add_host("host3"))
    joined = time.time()
    logs, status = follow_from_laptop(ray_hosts, job)
    assert status == "SUCCEEDED", logs[-3000:]
    after = [event for event in events(run_dir) if event["time"] > lost]
    resumed = next(event for event in after if event["kind"] == "resume")
    first = next(event for event in after if event["kind"] == "step")
    assert (resumed["step"], first["step"]) == (EVERY, EVERY + 1), (resumed, first)
    return {"join_s": round(joined - lost, 1), "resume_s": round(resumed["time"] - lost, 1),
            "next_step_s": round(first["time"] - lost, 1), "lost_steps": PAUSE_STEP - EVERY}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    rank = commands.add_parser("rank", help="internal: one rank of the EP step bench")
    for flag in ("--rank", "--local-rank", "--port"):
        rank.add_argument(flag, type=int, required=True)
    rank.add_argument("--master", required=True)
    for each in (parser, rank):
        each.add_argument("--steps", type=int, default=20, help="timed EP=2 steps per round and placement")
        each.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.command == "rank":
        rank_main(args)
        return
    check_namespaces_available()
    started, load = time.time(), os.getloadavg()[0]
    with made_hosts() as hosts:
        ep = bench_ep_step(hosts, args)
        loss = bench_host_loss(hosts)
    print(f"{'EP=2 ranks on':<14}{'median step (ms)':>18}{'all-to-all share':>18}")
    for name, figures in ep.items():
        print(f"{name:<14}{figures['step_ms']:>18.1f}{figures['all_to_all_share']:>18.1%}")
    print(f"host loss -> fresh host joined {loss['join_s']} s, resumed {loss['resume_s']} s, next training step "
          f"{loss['next_step_s']} s ({loss['lost_steps']} steps redone)")
    print(json.dumps({"bench": "hosts", "ep2_step": ep, "host_loss": loss, "load_at_start": round(load, 2),
                      "wall_s": round(time.time() - started), "steps": args.steps, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
