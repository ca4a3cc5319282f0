"""Where `ember run`'s start-up goes: CPU seconds per process until the first training step.

    python bench/startup.py [--rounds 2] [--steps 5] [--compare-env NAME=VALUE ...] [--cluster]

Runs `ember run jobs/quickstart.yaml` for a few steps (shards built, a fresh run folder each time) and samples
every process on the machine (psutil, every 0.1 s) until rank 0 writes its first step event: each process's CPU
time (user + system) spent since the round began is summed by role, with when the role's first process started.
On a machine of N cores, CPU seconds / N is the least wall time that work can take however it is overlapped:
when the CPU is busy nearly all the time, start-up is bound by that work, and only less work (fewer processes,
fewer imports) makes it shorter. Rounds alternate between variants:
- --compare-env: the plain environment and one with those variables set (e.g. PYTHONPATH of another checkout);
- --cluster: the embedded Ray (`cluster.address: local`, the default) and a cluster `ember up` started once
  before the rounds, joined with `cluster.address: auto`; its first run (the cluster's first job) is reported
  apart, as "first run on a fresh cluster".
Before each round it waits (up to 3 minutes) for the 1-minute load to fall under --quiet-load, and prints the
load it started at. Run it on an otherwise quiet machine: every process's CPU counts. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "jobs" / "quickstart.yaml"
AGENTS = {"gcs_server": "GCS", "raylet": "raylet", "dashboard/agent.py": "dashboard agent",
          "runtime_env/agent/main.py": "runtime env agent", "log_monitor.py": "log monitor",
          "dashboard/dashboard.py": "dashboard", "monitor.py": "autoscaler monitor"}


def role(process: psutil.Process, root: int, titles: dict[int, str]) -> str:
    """What a process is, by its command line: the driver, one of Ray's daemons, or a Ray worker by the
    most specific title it showed (Ray renames workers `ray::Class.method`); anything else by its command line."""
    if process.pid == root:
        return "driver (ember run)"
    title = titles.get(process.pid, "")
    for marker, name in AGENTS.items():
        if marker in title:
            return name
    if title.startswith("ray::"):
        name = title[5:].split(".")[0].split(" ")[0]
        return "idle Ray worker (never used)" if name == "IDLE" else f"Ray worker: {name}"
    if title.startswith("ray-dashboard-"):
        return "dashboard"  # its modules' processes
    if "ray" not in title and "ember" not in title:
        return "rest of the machine"
    return f"other: {title[:40]}"


def sample(tree: dict[int, psutil.Process], cpu: dict[int, float], titles: dict[int, str],
           baseline: dict[int, float]) -> None:
    """Every process but this one: CPU seconds since the round began (since it started, for a new one)."""
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        tree.setdefault(process.pid, process)
        try:
            spent = cpu_seconds(process)
            cmdline = " ".join(process.cmdline())
        except psutil.Error:
            continue
        cpu[process.pid] = spent - baseline.get(process.pid, 0.0)
        previous = titles.get(process.pid, "")
        if not previous or previous.startswith("ray::IDLE") or not cmdline.startswith("ray::IDLE"):
            titles[process.pid] = cmdline  # keep the most specific title a worker showed


def first_step_seen(events: Path) -> bool:
    if not events.is_file():
        return False
    return any('"kind": "step"' in line or '"kind":"step"' in line for line in events.read_text().splitlines())


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def cpu_now() -> dict[int, float]:
    now = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            now[process.pid] = cpu_seconds(process)
    return now


def measure(run_dir: Path, steps: int, extra_env: dict[str, str], extra_sets: list[str]) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **extra_env}
    command = [sys.executable, "-m", "ember.cli", "run", str(SPEC), "--set", f"run_dir={run_dir}",
               "--set", f"schedule.steps={steps}", "--set", "logging.sample_tokens=0"]
    for item in extra_sets:
        command += ["--set", item]
    baseline = cpu_now()
    started = time.time()
    log = run_dir.parent / f"{run_dir.name}.log"  # a file, not a pipe: a full pipe would stall the run
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=output)
    tree: dict[int, psutil.Process] = {}
    cpu: dict[int, float] = {}
    titles: dict[int, str] = {}
    while not first_step_seen(run_dir / "events.jsonl"):
        if driver.poll() is not None:
            raise SystemExit(f"ember run exited ({driver.returncode}) before its first step:\n{log.read_text()}")
        sample(tree, cpu, titles, baseline)
        time.sleep(0.1)
    first_step_s = time.time() - started
    sample(tree, cpu, titles, baseline)
    by_role: dict[str, list[float]] = collections.defaultdict(list)
    born: dict[str, float] = {}
    for pid, seconds in cpu.items():
        if seconds < 0.005:
            continue  # a process that did nothing during the round
        name = role(tree[pid], driver.pid, titles)
        by_role[name].append(seconds)
        with contextlib.suppress(psutil.Error):
            born[name] = min(born.get(name, float("inf")), tree[pid].create_time() - started)
    if driver.wait(timeout=600) != 0:
        raise SystemExit(f"ember run failed ({driver.returncode}):\n{log.read_text()[-3000:]}")
    total = sum(cpu.values())
    return {"first_step_s": round(first_step_s, 2), "cpu_s": round(total, 2),
            "roles": {name: [len(times), round(sum(times), 2), round(born.get(name, 0.0), 1)] for name, times in
                      sorted(by_role.items(), key=lambda item: born.get(item[0], 0.0))}}


CLUSTER = {"name": "ember-startup-bench", "port": "28265", "gcs_port": "26379"}  # outside Ray's worker ports


@contextlib.contextmanager
def ember_up(cores: int):
    """A cluster of this machine's cores started with `ember up` (its own name and ports), stopped after."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    up = [sys.executable, "-m", "ember.cli", "up", "--name", CLUSTER["name"], "--port", CLUSTER["port"],
          "--gcs-port", CLUSTER["gcs_port"], "--num-cpus", str(cores)]
    subprocess.run(up, env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        yield {"RAY_ADDRESS": f"127.0.0.1:{CLUSTER['gcs_port']}"}
    finally:
        subprocess.run([sys.executable, "-m", "ember.cli", "down", "--name", CLUSTER["name"]], env=env,
                       check=False, stdout=subprocess.DEVNULL)


def wait_for_quiet(threshold: float) -> float:
    deadline = time.time() + 180
    while os.getloadavg()[0] >= threshold and time.time() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def report(name: str, round_index: int, load: float, measured: dict, cores: int) -> None:
    busy = measured["cpu_s"] / measured["first_step_s"]
    print(f"{name} round {round_index} (load {load:.2f} at start): first step {measured['first_step_s']:.1f} s, "
          f"{measured['cpu_s']:.1f} CPU s = {busy:.2f} of {cores} cores busy", flush=True)
    for role_name, (count, seconds, born) in measured["roles"].items():
        when = f"at {max(born, 0.0):5.1f} s" if born > -1 else "before the run"  # start times are ~0.5 s coarse
        print(f"    {role_name:38s} {count:2d} process(es) {seconds:6.2f} CPU s, first started {when}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compare-env", nargs="*", default=[], metavar="NAME=VALUE")
    parser.add_argument("--cluster", action="store_true", help="also run on a cluster `ember up` started once")
    parser.add_argument("--quiet-load", type=float, default=1.0)
    args = parser.parse_args()
    from ember.data.build import ensure_shards
    from ember.spec import JobSpec

    ensure_shards(JobSpec.load(SPEC).data)  # what `ember run` of the quickstart would build, before any timing
    cores = os.cpu_count() or 1
    variants: dict[str, tuple[dict[str, str], list[str]]] = {"embedded Ray" if args.cluster else "as is": ({}, [])}
    if args.compare_env:
        variants[" ".join(args.compare_env)] = (dict(item.split("=", 1) for item in args.compare_env), [])
    results: dict[str, list[dict]] = {name: [] for name in variants}
    summary: dict = {"bench": "startup", "cores": cores}
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.cluster:
            cluster_env = stack.enter_context(ember_up(cores))
            variants["ember up cluster, reused"] = (cluster_env, ["cluster.address=auto"])
            results["ember up cluster, reused"] = []
            load = wait_for_quiet(args.quiet_load)
            first = measure(scratch / "first-on-cluster", args.steps, cluster_env, ["cluster.address=auto"])
            report("first run on a fresh cluster", 0, load, first, cores)
            summary["first run on a fresh cluster"] = {"first_step_s": first["first_step_s"], "cpu_s": first["cpu_s"]}
        for round_index in range(args.rounds):
            order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
            for name in order:
                load = wait_for_quiet(args.quiet_load)
                env, sets = variants[name]
                measured = measure(scratch / f"run-{round_index}-{order.index(name)}", args.steps, env, sets)
                results[name].append(measured)
                report(name, round_index, load, measured, cores)
    for name, runs in results.items():
        summary[name] = {"first_step_s": statistics.median(r["first_step_s"] for r in runs),
                         "cpu_s": statistics.median(r["cpu_s"] for r in runs),
                         "cpu_floor_s": round(statistics.median(r["cpu_s"] for r in runs) / cores, 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
