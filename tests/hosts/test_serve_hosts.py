"""`ember serve` on the namespaced cluster: started on the head host, joined with --address, one EP rank on
each cluster host (--spread-ranks), the HTTP port on the head's own IP behind a bearer token, and a client on
the laptop, which is outside the cluster."""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hosts.conftest import RayHosts
from tests.hosts.harness import Host

pytestmark = pytest.mark.hosts
PORT = 8000
PROMPT = "import os\n"
MAX_TOKENS = 16

# Run on the laptop: a greedy completion with the token, the same without it, the ranks /v1/models lists, and
# whether anything answers on the worker host's IP at the same port.
CLIENT = """
import json, sys
import requests
url, worker_url, token, prompt, max_tokens = sys.argv[1:6]
auth = {"Authorization": f"Bearer {token}"}
body = {"prompt": prompt, "max_tokens": int(max_tokens), "temperature": 0}
served = requests.post(f"{url}/v1/completions", json=body, headers=auth, timeout=120)
refused = requests.post(f"{url}/v1/completions", json=body, timeout=30)
ranks = requests.get(f"{url}/v1/models", headers=auth, timeout=30).json()["data"][0]["ranks"]
try:
    elsewhere = requests.get(f"{worker_url}/health", timeout=10).status_code
except requests.ConnectionError:
    elsewhere = "refused"
print(json.dumps({"with_token": served.status_code, "tokens": served.json()["choices"][0]["tokens"],
                  "without_token": refused.status_code, "ranks": ranks, "worker_port": elsewhere}))
"""


@pytest.fixture(scope="module")
def shared_moe_run(ray_hosts: RayHosts, moe_run: Path) -> Path:
    """The session's tiny MoE GPT trained with EP=2 (4 experts), copied to the shared folder both hosts read."""
    return Path(shutil.copytree(moe_run, ray_hosts.hosts.shared_dir / "serve-run"))


@contextlib.contextmanager
def serving(ray_hosts: RayHosts, run_dir: Path, token: str) -> Iterator[subprocess.Popen]:
    """`ember serve` on host1, joined to the cluster; Ctrl-C (by PID) at the end, so Serve shuts down and frees
    the port and the ranks' resources for the session's other tests."""
    head = ray_hosts.hosts.hosts["host1"]
    head.outside("/tmp/serve-token").write_text(token)
    log = head.outside("/tmp/serve.log")
    args = [str(run_dir), "--address", ray_hosts.gcs, "--ep", "2", "--spread-ranks", "--host", head.ip,
            "--port", str(PORT), "--token-file", "/tmp/serve-token"]  # fmt: skip
    with open(log, "w") as output:
        server = head.popen([sys.executable, "-m", "ember.cli", "serve", *args], env={"PYTHONUNBUFFERED": "1"},
                            cwd=str(Path(__file__).resolve().parents[2]), stdout=output, stderr=subprocess.STDOUT)
    try:
        yield server
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_until_serving(server: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while "serving " not in log.read_text():
        assert server.poll() is None, f"ember serve exited {server.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"not serving after {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def greedy_reference(ray_hosts: RayHosts, host: Host, run_dir: Path) -> list[int]:
    """`ember generate` of the same checkpoint, in one process on a cluster host."""
    done = ray_hosts.ember(host, "generate", str(run_dir), "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS),
                           "--greedy", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["tokens"]


def test_ep2_serving_puts_a_rank_on_each_host_and_answers_the_laptop_with_the_token(
    ray_hosts: RayHosts, shared_moe_run: Path
) -> None:
    hosts = ray_hosts.hosts.hosts
    head, worker, laptop = hosts["host1"], ray_hosts.workers[-1], hosts["laptop"]
    token = secrets.token_hex(16)
    with serving(ray_hosts, shared_moe_run, token) as server:
        expected = greedy_reference(ray_hosts, worker, shared_moe_run)  # while the server starts
        wait_until_serving(server, head.outside("/tmp/serve.log"))
        urls = [f"http://{host.ip}:{PORT}" for host in (head, worker)]
        asked = laptop.run([sys.executable, "-c", CLIENT, *urls, token, PROMPT, str(MAX_TOKENS)], timeout=180)
        assert asked.returncode == 0, asked.stderr[-3000:]
    seen = json.loads(asked.stdout)
    assert (seen["with_token"], seen["without_token"]) == (200, 401)
    assert seen["tokens"] == expected
    assert sorted(rank["host"] for rank in seen["ranks"]) == sorted([head.name, worker.name])
    assert sorted(rank["ip"] for rank in seen["ranks"]) == sorted([head.ip, worker.ip])
    assert [rank["experts"] for rank in seen["ranks"]] == [{"1": [0, 1]}, {"1": [2, 3]}]  # each host: its half
    assert seen["worker_port"] == "refused"  # one HTTP proxy, on the head
    assert server.returncode in (0, 130), head.outside("/tmp/serve.log").read_text()[-4000:]  # Ctrl-C: clean exit
