"""`ember up --block`: the process a scheduler signals. SIGTERM (a spot reclaim, `scancel`, a pod's deletion)
drains this node instead of killing Ray under the training job.

On SIGTERM the supervisor asks the GCS to drain its own node with reason preemption and a deadline (now +
grace). Ray then schedules nothing new there; ember's training loop sees the drain within a few seconds,
checkpoints at the next step boundary and restarts its workers on the other nodes. Once the node is idle
(the raylet exits on its own when a draining node has nothing left) or the deadline passes, the supervisor
stops the Ray processes it started - found by their temp folder, never `ray stop` - and exits.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from ember.cluster.local import LocalCluster, ray_env, stop_processes_under

DEFAULT_GRACE_S = 60
POLL_S = 0.5
PREEMPTION_REASON = "DRAIN_NODE_REASON_PREEMPTION"


@dataclass(frozen=True)
class Drain:
    """A drain under way: when it was asked and by when the node must be gone."""

    started_s: float  # time.time()
    grace_s: float

    @property
    def deadline_s(self) -> float:
        return self.started_s + self.grace_s

    @property
    def deadline_ms(self) -> int:
        """The GCS's form: an absolute wall-clock timestamp in ms (0 would mean no deadline)."""
        return max(1, int(self.deadline_s * 1000))


def ready_to_stop(drain: Drain, now_s: float, ray_gone: bool, node_idle: bool) -> bool:
    """Stop Ray once nothing runs on the node any more (or Ray already left), and at the deadline at the latest."""
    return ray_gone or node_idle or now_s >= drain.deadline_s


@dataclass(frozen=True)
class Raylet:
    pid: int
    node_id: str  # hex


def find_raylet(temp_dir: str) -> Raylet | None:
    """The raylet of the Ray that `ember up` started: the one whose command line names its temp folder."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].endswith("raylet") and any(temp_dir in part for part in cmdline):
            node = next((part.split("=", 1)[1] for part in cmdline if part.startswith("--node_id=")), None)
            if node:
                return Raylet(process.pid, node)
    return None


class NodeDrainer:
    """Talks to the GCS for one node: asks the drain, tells whether the node is idle."""

    def __init__(self, gcs_address: str, node_id: str) -> None:
        import ray._raylet
        from ray.core.generated import autoscaler_pb2

        self.client = ray._raylet.GcsClient(address=gcs_address)
        self.node_id = node_id
        self.reason = autoscaler_pb2.DrainNodeReason.Value(PREEMPTION_REASON)

    def request(self, drain: Drain, message: str) -> str | None:
        """None when the GCS accepted the drain, else why not."""
        accepted, why = self.client.drain_node(self.node_id, self.reason, message, drain.deadline_ms)
        return None if accepted else (why or "refused")

    def idle(self) -> bool:
        """The raylet's own view: a positive idle duration means no lease, task or actor holds the node."""
        usage = self.client.get_all_resource_usage(timeout=5)
        for node in usage.resource_usage_data.batch:
            if node.node_id.hex() == self.node_id:
                return node.idle_duration_ms > 0
        return True  # the node left the GCS: nothing runs there


def supervise(cluster: LocalCluster, grace_s: float, say: Callable[[str], None]) -> int:
    """Block until SIGTERM/SIGINT (then drain and stop this node's Ray) or until this Ray dies by itself."""
    raylet = find_raylet(cluster.temp_dir)
    if raylet is None:
        say(f"no raylet under {cluster.temp_dir}: Ray did not start")
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    while not stop.wait(POLL_S):
        if not psutil.pid_exists(raylet.pid):
            say("this node's Ray exited by itself; stopping what is left of it")
            stop_processes_under(cluster.temp_dir)
            return 1
    drain_and_stop(cluster, raylet, grace_s, say)
    return 0


def drain_and_stop(cluster: LocalCluster, raylet: Raylet, grace_s: float, say: Callable[[str], None]) -> None:
    drain = Drain(time.time(), grace_s)
    drainer, refused = ask_drain(cluster.address, raylet.node_id, drain)
    if drainer is not None:
        say(f"draining node {raylet.node_id[:12]} (preemption, deadline in {grace_s:.0f} s)")
        while not ready_to_stop(drain, time.time(), not psutil.pid_exists(raylet.pid), node_idle(drainer)):
            time.sleep(POLL_S)
    else:
        say(f"the cluster refused to drain this node ({refused}); stopping it now")
    stopped = stop_processes_under(cluster.temp_dir)
    say(f"stopped {stopped} Ray processes of this node")


def ask_drain(gcs_address: str, node_id: str, drain: Drain) -> tuple[NodeDrainer | None, str | None]:
    """(the drainer, None) when the GCS accepted the drain, else (None, why not)."""
    os.environ.update({key: ray_env()[key] for key in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")})  # token auth
    try:
        drainer = NodeDrainer(gcs_address, node_id)
        refused = drainer.request(drain, "ember up got SIGTERM (preemption)")
    except Exception as err:  # a head already gone, a GCS that does not answer: stop as before
        return None, f"{type(err).__name__}: {err}"
    return (None, refused) if refused else (drainer, None)


def node_idle(drainer: NodeDrainer) -> bool:
    try:
        return drainer.idle()
    except Exception:  # the GCS is gone (the head was reclaimed too): nothing to wait for
        return True
