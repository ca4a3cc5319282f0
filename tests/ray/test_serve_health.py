"""A long prefill does not get a healthy replica replaced: a decode step held (at the named fault point
`serve_step`, not by racing a timer) while Serve runs its health checks every 5 s passes every one of them,
the replica is not restarted, and the held request then completes with `ember generate`'s tokens.

Before health pings had their own concurrency group, each ping waited behind the running step, failed after
HEALTH_PING_TIMEOUT_S, and Serve replaced the replica, failing every request in flight.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from ember.generation.sampling import SamplingParams
from ember.serve.generate import generate
from tests.helpers.distributed import free_port

pytestmark = pytest.mark.ray
TOKEN = "test-token-health"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HELD_CHECKS = 4  # at Serve's 5 s period: a prefill of 20 s or more
PROMPT = "class Tree:\n    "


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fault's marker: `<marker>.paused` appears when rank 0 holds its first step, `<marker>.go` lets it go."""
    return tmp_path_factory.mktemp("fault") / "first-step"


@pytest.fixture(scope="module")
def run_dir(moe_run: Path) -> Path:
    return moe_run  # trained with EP=2, served here by one rank


@pytest.fixture(scope="module")
def server(run_dir: Path, held: Path) -> Iterator[str]:
    import ray
    from ember.serve.app import ServeOptions, start_application
    from ray import serve

    port = free_port()
    os.environ["EMBER_FAULT"] = f"serve_step:0:*:pause@{held}"  # the raylet, so every rank actor, inherits it
    try:
        ray.init(num_cpus=3, include_dashboard=False, namespace="ember-test-health", log_to_driver=False)
    finally:
        del os.environ["EMBER_FAULT"]  # this process's own steps (the reference below) must not pause
    try:
        start_application(ServeOptions(checkpoint=str(run_dir), port=port, token=TOKEN, ep_size=1, name="held"))
        yield f"http://127.0.0.1:{port}"
    finally:
        held.with_name(held.name + ".go").touch()
        serve.shutdown()
        ray.shutdown()


def metric(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", headers=AUTH, timeout=30).text
    return float(next(line for line in text.splitlines() if line.startswith(f"{name} ")).split()[1])


def wait_for(condition, what: str, timeout_s: float = 120) -> None:
    """A failure deadline, not a race: the condition is what the test waits for."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_held_prefill_passes_every_health_check_and_the_replica_stays(server: str, run_dir: Path, held: Path):
    restarts = metric(server, "ember_replica_restarts_total")
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(requests.post, f"{server}/v1/completions", json=body, headers=AUTH, timeout=300)
        paused = held.with_name(held.name + ".paused")
        wait_for(paused.exists, "rank 0 never reached its first step")
        checks = metric(server, "ember_health_checks_total")
        wait_for(lambda: metric(server, "ember_health_checks_total") >= checks + HELD_CHECKS,
                 f"{HELD_CHECKS} health checks did not pass while a step was running", timeout_s=HELD_CHECKS * 15)
        assert not answer.done()  # the step was held the whole time
        held.with_name(held.name + ".go").touch()
        response = answer.result(timeout=300)
    assert response.status_code == 200, response.text
    expected = generate(run_dir, PROMPT, 8, SamplingParams(temperature=0)).tokens
    assert response.json()["choices"][0]["tokens"] == expected
    assert metric(server, "ember_replica_restarts_total") == restarts
