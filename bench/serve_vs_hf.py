"""Serving: `ember serve` vs `transformers serve` on the same exported model, tokens/s at 1 and 16 clients.

    pip install -c constraints.txt -e '.[test,bench]'     # transformers serve needs accelerate
    python bench/serve_vs_hf.py [--requests 32] [--max-tokens 32] [--rounds 2] [--hf-threads 1]

One Mixtral-style MoE checkpoint (rmsnorm, rope, SwiGLU experts, no bias, 4 experts top-2, every block MoE; d_model
192, 6 heads, 4 layers, seq 128), trained briefly by 2 DeepSpeed ranks, is exported with the real CLI
(`ember ckpt export RUN --format hf`) as MixtralForCausalLM. `ember serve RUN` (EP=1) and `transformers serve HF_DIR`
(continuous batching unless --no-hf-continuous-batching; offline, HF_HUB_OFFLINE=1) run as subprocesses on
127.0.0.1, each on its own port, and are stopped by PID at the end. Rounds alternate between the two so load
drift hits both alike: `--requests` greedy /v1/completions from 1 client one after the other, then from 16 at
once, the same prompts and max_tokens to both. ember has no EOS and always generates max_tokens; transformers is
asked for at least max_tokens (generation_config min_new_tokens), and tokens/s counts usage.completion_tokens
either way, so an early stop would not inflate it. ember's serving rank computes on 1 torch thread; transformers
gets --hf-threads (OMP_NUM_THREADS). The greedy texts of the two servers for each prompt are compared (same model,
so they should agree, modulo fp32 ties). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
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

MIXTRAL_MODEL = {
    "d_model": 192, "n_heads": 6, "n_layers": 4, "seq_len": 128, "norm": "rmsnorm", "position": "rope",
    "mlp": "swiglu", "bias": False, "tie_embeddings": False,
    "moe": {"top_k": 2, "every_n_layers": 1, "drop_tokens": False},
}
PROMPTS = ["def ", "import os\n", "class Tree:\n    ", "    return ", "# ", "x = ", "for i in", "if __name__"]
SERVERS = ("ember", "transformers")
READY_TIMEOUT_S = 600.0


class Server:
    """One OpenAI-compatible server subprocess in its own session (stopped by its PID, its group as a fallback)."""

    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str], extra: dict, log: Path):
        self.name, self.url, self.extra = name, f"http://127.0.0.1:{port}", extra
        self.log = log.open("w")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).ok:
                    return
            except requests.RequestException:  # not listening yet, or its proxy not answering yet
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} server not ready in {READY_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-20:])

    def stop(self) -> None:
        """SIGINT (Ctrl-C: ember shuts Serve and its embedded Ray down), then the process group if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def start_servers(run_dir: Path, hf_dir: Path, args, logs: Path) -> dict[str, Server]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform"), "RAY_USAGE_STATS_ENABLED": "0"}
    ember_port, hf_port = free_port(), free_port()
    ember = Server("ember", [sys.executable, "-m", "ember.cli", "serve", str(run_dir), "--ep", "1",
                             "--host", "127.0.0.1", "--port", str(ember_port)],
                   ember_port, env, {}, logs / "ember.log")  # fmt: skip
    batching = "--continuous-batching" if args.hf_continuous_batching else "--no-continuous-batching"
    hf_env = {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.hf_threads)}
    at_least = {"model": str(hf_dir), "generation_config": json.dumps({"min_new_tokens": args.max_tokens})}
    transformers = Server("transformers", ["transformers", "serve", str(hf_dir), batching, "--device", "cpu",
                                           "--host", "127.0.0.1", "--port", str(hf_port), "--log-level", "warning"],
                          hf_port, hf_env, at_least, logs / "transformers.log")  # fmt: skip
    return {"ember": ember, "transformers": transformers}


def one_request(session: requests.Session, server: Server, index: int, max_tokens: int) -> tuple[float, int, str]:
    body = {"prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0, **server.extra}
    started = time.perf_counter()
    response = session.post(f"{server.url}/v1/completions", json=body, timeout=600)
    if not response.ok:
        raise RuntimeError(f"{server.name}: HTTP {response.status_code}: {response.text[:500]}")
    answer = response.json()
    return time.perf_counter() - started, answer["usage"]["completion_tokens"], answer["choices"][0]["text"]


def measure(server: Server, clients: int, count: int, max_tokens: int) -> dict[str, float]:
    sessions = [requests.Session() for _ in range(clients)]

    def client(worker: int) -> list[tuple[float, int, str]]:
        return [one_request(sessions[worker], server, i, max_tokens) for i in range(worker, count, clients)]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [result for part in pool.map(client, range(clients)) for result in part]
    elapsed = time.perf_counter() - started
    return {
        "tokens_per_s": sum(tokens for _, tokens, _ in results) / elapsed,
        "p50_ms": 1000 * statistics.median(latency for latency, _, _ in results),
        "short": sum(tokens < max_tokens for _, tokens, _ in results),  # completions that stopped early
    }


def greedy_texts(server: Server, max_tokens: int) -> list[str]:
    with requests.Session() as session:
        return [one_request(session, server, i, max_tokens)[2] for i in range(len(PROMPTS))]


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def make_exported_checkpoint(scratch: Path) -> tuple[Path, Path]:
    """A trained Mixtral-style run (EP=1 training: 2 data-parallel ranks) and its `ember ckpt export --format hf`."""
    run_dir, hf_dir = scratch / "run", scratch / "hf"
    write_moe_checkpoint(run_dir, 1, MIXTRAL_MODEL)
    command = [sys.executable, "-m", "ember.cli", "ckpt", "export", str(run_dir), "--format", "hf",
               "--out", str(hf_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    print(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout.strip(), flush=True)
    return run_dir, hf_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="completions per measurement")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hf-threads", type=int, default=1, help="transformers' torch threads (ember's rank: 1)")
    parser.add_argument("--hf-continuous-batching", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ember-bench-serve-hf-") as scratch:
        run_dir, hf_dir = make_exported_checkpoint(Path(scratch))
        started = time.monotonic()
        servers = start_servers(run_dir, hf_dir, args, Path(scratch))
        try:
            for server in servers.values():
                server.wait_ready(started + READY_TIMEOUT_S)
            print(f"both servers ready in {time.monotonic() - started:.1f} s", flush=True)
            texts = {name: greedy_texts(server, args.max_tokens) for name, server in servers.items()}  # + warm-up
            rounds: dict[tuple[str, int], list[dict[str, float]]] = {(s, c): [] for c in (1, 16) for s in SERVERS}
            for _ in range(args.rounds):
                for name, clients in rounds:
                    rounds[(name, clients)].append(measure(servers[name], clients, args.requests, args.max_tokens))
        finally:
            for server in servers.values():
                server.stop()
        agree = sum(a == b for a, b in zip(texts["ember"], texts["transformers"], strict=True))
        report(args, {key: median_of(value) for key, value in rounds.items()}, agree)


def report(args, results: dict[tuple[str, int], dict[str, float]], agree: int) -> None:
    batching = "continuous batching" if args.hf_continuous_batching else "sequential generate"
    print(f"{args.requests} greedy completions x {args.max_tokens} tokens per measurement, median of {args.rounds}; "
          f"transformers: {batching}, {args.hf_threads} thread(s)")  # fmt: skip
    print(f"{'server':>12} {'clients':>7} {'tok/s':>8} {'p50 ms':>8} {'short':>5}")
    for (name, clients), r in results.items():
        print(f"{name:>12} {clients:>7} {r['tokens_per_s']:>8.1f} {r['p50_ms']:>8.1f} {r['short']:>5.0f}")
    ratio = {c: results[("ember", c)]["tokens_per_s"] / results[("transformers", c)]["tokens_per_s"] for c in (1, 16)}
    print(f"ember / transformers tokens/s: 1 client {ratio[1]:.2f}   16 clients {ratio[16]:.2f}")
    print(f"greedy texts agree on {agree} of {len(PROMPTS)} prompts")
    summary = {
        "ember_over_hf_1_client": round(ratio[1], 2),
        "ember_over_hf_16_clients": round(ratio[16], 2),
        "greedy_agree": agree,
        "prompts": len(PROMPTS),
        **{f"{name}_c{c}_{key}": round(value, 2) for (name, c), r in results.items() for key, value in r.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
