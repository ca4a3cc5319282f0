"""Serving: requests/s, tokens/s and latency of `ember serve` with 1 vs 16 concurrent clients, EP=2 vs EP=1.

    python bench/serve.py [--requests 48] [--max-tokens 32] [--checkpoint RUN_DIR]

One embedded Ray, one Serve instance on 127.0.0.1 holding two applications of the same checkpoint: EP=2
at / and EP=1 at /ep1. The checkpoint (unless --checkpoint is given) is a GPT of d_model 192, 6 heads,
4 layers, seq 128, 4 experts top-1, trained briefly with EP=2 by 2 DeepSpeed ranks. Rounds alternate
between the two so load drift hits both alike. Each round sends `--requests` greedy completions of
exactly --max-tokens tokens from 1 client one after the other, then from 16 clients at once. Batching
gain = tokens/s with 16 clients over tokens/s with 1 (target >= 4).

Per-step overhead (issue 15): the wall time of one decode step of a sequence served alone, less the
rank's own work for that step. The wall time is the latency difference between greedy completions of
--long and --short tokens divided by the tokens between them, so the HTTP request, the prefill and the
first token cancel out. The rank's work is the same decode steps (same positions) run by the same
DecodeRunner in this process on 1 thread, as a rank runs them. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers: the checkpoint writer and free_port the tests use

from tests.helpers.distributed import free_port  # noqa: E402
from tests.helpers.moe_checkpoint import write_moe_checkpoint  # noqa: E402

BENCH_MODEL = {"d_model": 192, "n_heads": 6, "n_layers": 4, "seq_len": 128}
PROMPTS = ["def ", "import os\n", "class Tree:\n    ", "    return ", "# ", "x = ", "for i in", "if __name__"]


def one_request(session: requests.Session, url: str, index: int, max_tokens: int) -> tuple[float, int]:
    body = {"prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    response = session.post(f"{url}/v1/completions", json=body, timeout=300)
    response.raise_for_status()
    return time.perf_counter() - started, response.json()["usage"]["completion_tokens"]


def measure(url: str, clients: int, count: int, max_tokens: int) -> dict[str, float]:
    sessions = [requests.Session() for _ in range(clients)]

    def client(worker: int) -> list[tuple[float, int]]:
        return [one_request(sessions[worker], url, i, max_tokens) for i in range(worker, count, clients)]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [result for part in pool.map(client, range(clients)) for result in part]
    elapsed = time.perf_counter() - started
    latencies = sorted(latency for latency, _ in results)
    return {
        "requests_per_s": len(results) / elapsed,
        "tokens_per_s": sum(tokens for _, tokens in results) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
    }


def per_token_ms(url: str, short: int, long: int, repeats: int) -> float:
    """Wall ms per decode step of one sequence alone, seen by a client."""
    session = requests.Session()

    def latency(tokens: int) -> float:
        return statistics.median(one_request(session, url, 0, tokens)[0] for _ in range(repeats))

    return 1000 * (latency(long) - latency(short)) / (long - short)


def forward_ms(checkpoint: Path, short: int, long: int, repeats: int) -> float:
    """The rank's own work (forward + pick) per decode step at the positions per_token_ms times."""
    import torch

    from ember.checkpoint.readers import read_checkpoint_spec
    from ember.data.tokenizer import checkpoint_tokenizer
    from ember.generation.decode import Admit, DecodeRunner, StepPlan
    from ember.generation.sampling import SamplingParams
    from ember.serve.weights import load_rank_model

    torch.set_num_threads(1)  # as ExpertShard
    folder, _, spec = read_checkpoint_spec(checkpoint)
    model, _ = load_rank_model(folder, verify=False)
    prompt = checkpoint_tokenizer(folder, spec).encode(PROMPTS[0])
    times = []
    for _ in range(repeats):
        runner = DecodeRunner(model)
        runner.step(StepPlan(admit=[Admit(0, prompt, SamplingParams(temperature=0))]))
        for _ in range(short - 1):
            runner.step(StepPlan(decode=[0]))
        started = time.perf_counter()
        for _ in range(long - short):
            runner.step(StepPlan(decode=[0]))
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times) / (long - short)


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=48, help="completions per measurement")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, default=None, help="run or checkpoint folder (else one is made)")
    parser.add_argument("--short", type=int, default=8, help="per-step overhead: the shorter completion")
    parser.add_argument("--long", type=int, default=72, help="per-step overhead: the longer completion")
    args = parser.parse_args()

    import ray
    from ember.serve.app import ServeOptions, start_application
    from ray import serve

    scratch = tempfile.TemporaryDirectory(prefix="ember-bench-serve-")
    checkpoint = args.checkpoint or write_moe_checkpoint(Path(scratch.name) / "run", 2, BENCH_MODEL)
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, namespace="ember-bench-serve", log_to_driver=False)
    try:
        started = time.perf_counter()
        for ep, prefix in ((2, "/"), (1, "/ep1")):
            start_application(ServeOptions(str(checkpoint), ep_size=ep, port=port, name=f"ep{ep}"), prefix)
        print(f"both applications ready in {time.perf_counter() - started:.1f} s", flush=True)
        urls = {2: f"http://127.0.0.1:{port}", 1: f"http://127.0.0.1:{port}/ep1"}
        for url in urls.values():
            measure(url, 4, 8, args.max_tokens)  # warm-up
        steps = {ep: [] for ep in (2, 1)}
        for _ in range(args.rounds):
            for ep in steps:
                steps[ep].append(per_token_ms(urls[ep], args.short, args.long, 3))
        step_ms = {ep: statistics.median(values) for ep, values in steps.items()}
        work_ms = forward_ms(Path(checkpoint), args.short, args.long, 3)
        rounds: dict[tuple[int, int], list[dict[str, float]]] = {(ep, c): [] for ep in (2, 1) for c in (1, 16)}
        for _ in range(args.rounds):
            for ep, clients in rounds:
                rounds[(ep, clients)].append(measure(urls[ep], clients, args.requests, args.max_tokens))
        report(args, {key: median_of(value) for key, value in rounds.items()}, step_ms, work_ms)
    finally:
        serve.shutdown()
        ray.shutdown()
        scratch.cleanup()


def report(args, results: dict[tuple[int, int], dict[str, float]], step_ms: dict[int, float], work_ms: float) -> None:
    print(f"{args.requests} greedy completions x {args.max_tokens} tokens per measurement, median of {args.rounds}")
    print(f"{'EP':>3} {'clients':>7} {'req/s':>7} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for (ep, clients), r in results.items():
        print(f"{ep:>3} {clients:>7} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}")  # fmt: skip
    gain = {ep: results[(ep, 16)]["tokens_per_s"] / results[(ep, 1)]["tokens_per_s"] for ep in (2, 1)}
    ep_ratio = {c: results[(2, c)]["tokens_per_s"] / results[(1, c)]["tokens_per_s"] for c in (1, 16)}
    print(f"batching gain (tokens/s, 16 clients / 1): EP=2 {gain[2]:.2f}x   EP=1 {gain[1]:.2f}x   (target >= 4)")
    print(f"EP=2 / EP=1 tokens/s: 1 client {ep_ratio[1]:.2f}   16 clients {ep_ratio[16]:.2f}")
    print(f"one sequence alone, decode steps {args.short}..{args.long}: the rank's own work {work_ms:.2f} ms/step")
    for ep in (1, 2):
        print(f"  EP={ep}: {step_ms[ep]:.2f} ms/step served, overhead {step_ms[ep] - work_ms:.2f} ms/step")
    summary = {
        "work_ms": round(work_ms, 2),
        **{f"ep{ep}_step_ms": round(step_ms[ep], 2) for ep in (1, 2)},
        **{f"ep{ep}_overhead_ms": round(step_ms[ep] - work_ms, 2) for ep in (1, 2)},
        "batching_gain_ep2": round(gain[2], 2),
        "batching_gain_ep1": round(gain[1], 2),
        "ep2_over_ep1_1_client": round(ep_ratio[1], 2),
        "ep2_over_ep1_16_clients": round(ep_ratio[16], 2),
        **{f"ep{ep}_c{c}_{key}": round(value, 2) for (ep, c), r in results.items() for key, value in r.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
