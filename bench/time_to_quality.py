"""Time to quality: `ember run` of the quickstart vs a plain single-process torch loop, side by side.

    python bench/time_to_quality.py [--budget-s 150] [--steps 300] [--eval-every 25] [--rounds 1] [--set K=V]

Both sides train jobs/quickstart.yaml's MoE GPT (byte tokens, d_model 128, 4 layers, 4 experts top-1 every
2nd layer) on its shards, with its AdamW (lr 3e-3, betas, eps, weight decay on matrices only), warmup and
cosine schedule to 0.1x over `--steps`, global batch (32 rows of 128 + 1 bytes) and grad clip 1.0, and both
evaluate the same held-out rows (the first eval_batches x micro_batch packed rows of val-000000.tar, what
ember's evaluation reads) every `--eval-every` steps. Each side gets `--budget-s` seconds of wall time,
counted from the moment its process is started, so start-up (interpreter, imports, Ray, DeepSpeed, data)
is included; a side that is still running at the budget is stopped and only evaluations inside it count.

(a) ember: `python -m ember.cli run jobs/quickstart.yaml --set ...` as a subprocess (embedded Ray, Ray
    Train, 2 workers x 1 torch thread, DeepSpeed ZeRO-2, expert parallelism 2, the shard stream and the
    quickstart's checkpoints; sampling off). Its held-out losses and their times come from the events.jsonl
    that rank 0 writes (the same events as the printed `held-out loss` lines), as bench/launch.py reads it.
(b) plain: this script re-run in a fresh interpreter (`--plain-run`): one process, `--threads` torch threads
    (default 2 = ember's 2 workers x cpus_per_worker 1, the same cores in total), no Ray, DeepSpeed,
    torch.distributed, shard stream or checkpoints. The shards are read with `tarfile`, every document's
    bytes plus a 0 separator concatenated as nanoGPT's train.bin is, batches are random windows of that
    array (nanoGPT's get_batch), and the loop, optimizer setup, schedule and evaluation are written out here.
    The model is ember's `build_model` with every expert local (moe.ep_size 1): ember's models are plain
    nn.Modules with no distributed code, and the same module initialised from the same seed (experts are
    seeded by global id) makes the two sides differ in platform only, not in model code or initial weights.

Known differences, both of the plain kind a user would write: the plain loop takes its 32 rows in one
forward pass where ember's ranks take 16 each (so MoE capacity is counted over 4,096 tokens, not 2,048
per rank), and its rows are random windows where ember's slots read the shards in order.

Reported: held-out loss (nats/byte) of each side at equal wall times (the last evaluation at or before
each time), the wall time each needs to reach the worse of the two final losses (linear between
evaluations), and ember / plain of that time (goal: <= 1.2, issue 17); also the time to the first step and
the median step time of each. Shards are built beforehand when missing, outside both timings. Rounds
alternate which side runs first. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "jobs" / "quickstart.yaml"
SHARDS = REPO / "data" / "stdlib-text"
GOAL = 1.2  # issue 17: ember needs at most 1.2x the plain loop's time to reach the same loss
STOP_GRACE_S = 180  # after the budget, time for ember's preemption checkpoint and Ray's teardown

Curve = list[tuple[float, int, float]]  # (seconds since the process started, step, held-out nats/byte)


def spec_overrides(args: argparse.Namespace) -> list[str]:
    """What both sides read from the spec: the schedule asked for, then the user's --set."""
    return [f"schedule.steps={args.steps}", f"schedule.eval_every={args.eval_every}", *args.set]


def as_set_flags(items: list[str]) -> list[str]:
    return [part for item in items for part in ("--set", item)]


# ----------------------------------------------------------------------------------------------- (a) ember


def run_ember(args: argparse.Namespace, run_dir: Path) -> dict:
    from ember.errors import RESUMABLE_EXIT_CODE

    items = [*spec_overrides(args), f"run_dir={run_dir}", "checkpoint.resume=never", "logging.sample_tokens=0"]
    command = [sys.executable, "-m", "ember.cli", "run", str(SPEC), *as_set_flags(items)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as output:
        started = time.time()
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        code = wait_within_budget(process, args.budget_s, started)
    if code not in (0, RESUMABLE_EXIT_CODE, -signal.SIGTERM, -signal.SIGKILL):
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"ember run exited with {code}; the end of {log}:\n{tail}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    steps = [e["time"] - started for e in events if e["kind"] == "step"]
    evals = [(e["time"] - started, e["step"], e["val_loss"]) for e in events if e["kind"] == "eval"]
    return summarise(evals, steps, args.budget_s)


def wait_within_budget(process: subprocess.Popen, budget_s: float, started: float) -> int:
    """The exit code; at the budget, SIGTERM (ember checkpoints and stops), and SIGKILL to its session after a grace."""
    try:
        return process.wait(timeout=max(0.0, started + budget_s - time.time()))
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


# ----------------------------------------------------------------------------------------------- (b) plain


def run_plain(args: argparse.Namespace, scratch: Path) -> dict:
    out = scratch / "plain.json"
    command = [sys.executable, __file__, "--plain-run", str(out), "--budget-s", str(args.budget_s),
               "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--threads", str(args.threads),
               *as_set_flags(args.set)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started = time.time()
    subprocess.run([*command, "--started", repr(started)], env=env, check=True, timeout=args.budget_s + 300)
    measured = json.loads(out.read_text())
    return summarise([tuple(e) for e in measured["evals"]], measured["steps"], args.budget_s)


def documents(path: Path):
    """Each sample's text bytes, in tar order (a sample's members share the name up to the first dot)."""
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".txt"):
                yield tar.extractfile(member).read()


def byte_tokens(paths: list[Path], limit: int | None = None):
    """Documents' bytes, each followed by the 0 separator, end to end as one uint8 array (`limit`: stop once
    that many tokens are in)."""
    import numpy as np

    pieces, count = [], 0
    for path in paths:
        for text in documents(path):
            pieces += [np.frombuffer(text, dtype=np.uint8), np.zeros(1, dtype=np.uint8)]
            count += len(text) + 1
            if limit is not None and count >= limit:
                return np.concatenate(pieces)[:limit]
    return np.concatenate(pieces)


def plain_training(args: argparse.Namespace) -> dict:
    """The whole plain loop; returns its held-out curve and step times, in seconds since `--started`."""
    import torch
    import torch.nn.functional as F

    from ember.models import build_model
    from ember.spec import JobSpec
    from ember.spec.moe import single_process

    torch.set_num_threads(args.threads)
    spec = JobSpec.load(SPEC, spec_overrides(args))
    model_spec, optim, schedule = spec.model, spec.optim, spec.schedule
    if model_spec.moe is not None and model_spec.moe.balance != "aux_loss":
        raise SystemExit("the plain loop balances experts by the aux loss only (moe.balance: aux_loss)")
    length, batch = model_spec.seq_len + 1, spec.global_batch
    train = torch.from_numpy(byte_tokens(sorted(SHARDS.glob("train-*.tar"))))
    held_out_rows = schedule.eval_batches * schedule.micro_batch
    held_out = torch.from_numpy(byte_tokens([SHARDS / "val-000000.tar"], held_out_rows * length)).long()
    held_out = held_out.view(schedule.eval_batches, schedule.micro_batch, length)
    torch.manual_seed(schedule.seed)
    model = build_model(single_process(model_spec), seed=schedule.seed)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": optim.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=optim.lr, betas=optim.betas,
                                  eps=optim.eps)
    aux_weight = model_spec.moe.aux_loss_weight if model_spec.moe else 0.0

    def learning_rate(step: int) -> float:  # linear warmup, then cosine to min_lr_ratio
        if step < optim.warmup_steps:
            return optim.lr * (step + 1) / optim.warmup_steps
        progress = min(1.0, (step - optim.warmup_steps) / max(1, schedule.steps - optim.warmup_steps))
        return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        losses = [F.cross_entropy(model(rows[:, :-1]).logits.flatten(0, 1), rows[:, 1:].flatten()) for rows in held_out]
        model.train()
        return float(torch.stack(losses).mean())

    generator = torch.Generator().manual_seed(schedule.seed)
    evals, step_times = [], []
    for step in range(schedule.steps):
        if time.time() - args.started >= args.budget_s:
            break
        starts = torch.randint(len(train) - length, (batch,), generator=generator).tolist()
        rows = torch.stack([train[i : i + length] for i in starts]).long()
        output = model(rows[:, :-1])
        loss = F.cross_entropy(output.logits.flatten(0, 1), rows[:, 1:].flatten()) + aux_weight * output.aux_loss
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if spec.engine.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.engine.grad_clip)
        optimizer.step()
        step_times.append(time.time() - args.started)
        if (step + 1) % schedule.eval_every == 0 or step + 1 == schedule.steps:
            held_out_loss = evaluate()
            evals.append((time.time() - args.started, step + 1, held_out_loss))
    return {"evals": evals, "steps": step_times}


# ------------------------------------------------------------------------------------------------ compare


def summarise(evals: Curve, step_times: list[float], budget_s: float) -> dict:
    inside = [e for e in evals if e[0] <= budget_s]
    if not inside:
        raise RuntimeError(f"no held-out evaluation within the {budget_s:.0f} s budget; raise --budget-s")
    intervals = [b - a for a, b in itertools.pairwise(step_times)]
    steady = intervals[10:] or intervals or [0.0]  # skip warm-up steps
    return {"evals": inside, "first_step_s": step_times[0], "final_loss": inside[-1][2], "steps": inside[-1][1],
            "step_ms": 1000 * statistics.median(steady)}


def time_to_reach(evals: Curve, target: float) -> float:
    """When the held-out loss first reaches `target`, linear between the evaluations around the crossing."""
    previous = None
    for seconds, _, loss in evals:
        if loss <= target:
            if previous is None:
                return seconds
            before_s, before_loss = previous
            return before_s + (seconds - before_s) * (before_loss - target) / (before_loss - loss)
        previous = (seconds, loss)
    raise ValueError(f"the curve never reaches {target}")


def loss_at(evals: Curve, seconds: float) -> tuple[int, float] | None:
    """(step, loss) of the last evaluation at or before `seconds`; None before the first one."""
    done = [(step, loss) for at, step, loss in evals if at <= seconds]
    return done[-1] if done else None


def compare(ember: dict, plain: dict) -> dict:
    target = max(ember["final_loss"], plain["final_loss"])
    ember_s, plain_s = time_to_reach(ember["evals"], target), time_to_reach(plain["evals"], target)
    return {"target_loss": target, "ember_time_to_target_s": ember_s, "plain_time_to_target_s": plain_s,
            "ember_over_plain_time": ember_s / plain_s}


def print_round(index: int, ember: dict, plain: dict, ratio: dict, budget_s: float, every_s: float) -> None:
    print(f"\nround {index}: held-out loss (nats/byte @ step) at equal wall times, start-up included")
    for seconds in [every_s * i for i in range(1, int(budget_s // every_s) + 1)]:
        print(f"  {seconds:5.0f} s   ember {table_cell(ember, seconds)}   plain {table_cell(plain, seconds)}")
    for name, side in (("ember", ember), ("plain", plain)):
        print(f"  {name}: first step {side['first_step_s']:.1f} s, step {side['step_ms']:.0f} ms, "
              f"{side['steps']} steps, final {side['final_loss']:.4f}")
    print(f"  to {ratio['target_loss']:.4f}: ember {ratio['ember_time_to_target_s']:.1f} s, plain "
          f"{ratio['plain_time_to_target_s']:.1f} s, ember/plain {ratio['ember_over_plain_time']:.3f} "
          f"(goal <= {GOAL})", flush=True)


def table_cell(side: dict, seconds: float) -> str:
    found = loss_at(side["evals"], seconds)
    return "      -      " if found is None else f"{found[1]:.4f} @{found[0]:>4}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=150.0, help="wall time each side gets, start-up included")
    parser.add_argument("--steps", type=int, default=300, help="the schedule both sides follow (the quickstart's)")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    parser.add_argument("--threads", type=int, help="the plain loop's torch threads; default: what ember's "
                        "workers get in total, cluster.num_workers x cpus_per_worker (the quickstart: 2 x 1)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, alternating which side runs first")
    parser.add_argument("--table-every-s", type=float, default=15.0, help="spacing of the equal-time table")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a spec override for both sides (repeatable; model, optim, schedule, engine.grad_clip "
                        "reach the plain loop, the data stays the quickstart's), e.g. checkpoint.every_n_steps=100000")
    parser.add_argument("--plain-run", type=Path, help=argparse.SUPPRESS)  # internal: be the plain side
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_run:
        args.plain_run.write_text(json.dumps(plain_training(args)))
        return
    from ember.data.build import ensure_shards
    from ember.spec import JobSpec

    cluster = JobSpec.load(SPEC, spec_overrides(args)).cluster  # a bad --set fails here, before any timing
    ember_threads = f"{cluster.num_workers} workers x {cluster.cpus_per_worker:g}"
    args.threads = args.threads or max(1, int(cluster.num_workers * cluster.cpus_per_worker))
    ensure_shards(JobSpec.load(SPEC).data)  # the quickstart's own shards (SHARDS), which both sides read
    rounds = []
    with tempfile.TemporaryDirectory(prefix="ember-ttq-") as scratch:
        for index in range(args.rounds):
            sides = {}
            for name in ("ember", "plain") if index % 2 == 0 else ("plain", "ember"):
                folder = Path(scratch) / f"{name}-{index}"
                folder.mkdir()
                sides[name] = run_ember(args, folder / "run") if name == "ember" else run_plain(args, folder)
            ratio = compare(sides["ember"], sides["plain"])
            print_round(index, sides["ember"], sides["plain"], ratio, args.budget_s, args.table_every_s)
            rounds.append({**ratio, **{f"{n}_{k}": sides[n][k] for n in sides
                                       for k in ("final_loss", "first_step_s", "step_ms", "steps")}})
    summary = {"bench": "time_to_quality", "model": "quickstart MoE GPT (byte-level, d_model 128, E=4 top-1)",
               "budget_s": args.budget_s, "steps": args.steps, "eval_every": args.eval_every,
               "threads": {"ember": ember_threads, "plain": args.threads}, "rounds": args.rounds,
               "goal_ember_over_plain_time": GOAL}
    for key in rounds[0]:
        summary[key] = round(statistics.median(r[key] for r in rounds), 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
