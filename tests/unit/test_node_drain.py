"""The pure parts of draining a node: the supervisor's stop decision and deadline, the loop's time-gated poll,
and the driver's choice to start another attempt."""

from __future__ import annotations

from pathlib import Path

import torch

from ember.cluster.drain import Drain, ready_to_stop
from ember.train.launch import drained_only
from ember.train.preemption import NODE_DRAINING, NodeDrainWatch, PreemptionWatch, request_preemption
from ember.world import World


def test_the_deadline_is_grace_after_the_request_in_gcs_milliseconds() -> None:
    drain = Drain(started_s=1000.0, grace_s=60)
    assert drain.deadline_s == 1060.0
    assert drain.deadline_ms == 1_060_000
    assert Drain(0.0, 0).deadline_ms == 1  # never 0: the GCS reads 0 as "no deadline"


def test_ray_is_stopped_when_the_node_is_idle_or_gone_and_at_the_deadline_at_the_latest() -> None:
    drain = Drain(started_s=1000.0, grace_s=60)
    assert not ready_to_stop(drain, 1030.0, ray_gone=False, node_idle=False)  # a job still checkpointing
    assert ready_to_stop(drain, 1030.0, ray_gone=False, node_idle=True)
    assert ready_to_stop(drain, 1030.0, ray_gone=True, node_idle=False)
    assert ready_to_stop(drain, 1060.0, ray_gone=False, node_idle=False)  # the deadline: stop whatever runs


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_loop_asks_the_gcs_at_most_every_poll_interval_and_only_about_its_own_nodes() -> None:
    clock, asked, draining = Clock(), [], set()

    def draining_nodes() -> set[str]:
        asked.append(clock.now)
        return set(draining)

    watch = NodeDrainWatch({"a", "b"}, draining_nodes, poll_s=2.0, clock=clock)
    draining.add("other-job-node")
    clock.now = 1.0
    assert not watch.check() and asked == []  # inside the interval: not even a query
    clock.now = 2.0
    assert not watch.check() and asked == [2.0]  # a node of another job drains: not ours
    draining.add("b")
    clock.now = 3.0
    assert not watch.check() and asked == [2.0]
    clock.now = 4.5
    assert watch.check() and watch.draining == {"b"}
    assert watch.check() and asked == [2.0, 4.5]  # once seen, it stays seen without asking again


def test_a_failed_query_is_no_drain_and_is_asked_again() -> None:
    clock, answers = Clock(), iter([RuntimeError("GCS unavailable"), {"a"}])

    def draining_nodes() -> set[str]:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    watch = NodeDrainWatch({"a"}, draining_nodes, poll_s=1.0, clock=clock)
    clock.now = 1.0
    assert not watch.check()
    clock.now = 2.0
    assert watch.check()


def test_a_drain_stops_the_loop_and_a_request_outranks_it(tmp_path: Path) -> None:
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    clock = Clock()
    watch = PreemptionWatch(tmp_path, world, NodeDrainWatch({"a"}, lambda: {"a"}, poll_s=1.0, clock=clock))
    assert watch.should_stop() is None
    clock.now = 1.0
    assert watch.should_stop() == NODE_DRAINING
    request_preemption(tmp_path, "SIGTERM")
    assert watch.should_stop() == "request"


def test_the_driver_starts_another_attempt_only_for_a_drain_it_was_not_asked_to_stop_during(tmp_path: Path) -> None:
    drained = {"step": 8, "preempted": True, "preempted_by": NODE_DRAINING}
    assert drained_only(drained, tmp_path)
    assert not drained_only({"step": 8, "preempted": True, "preempted_by": "request"}, tmp_path)
    assert not drained_only({"step": 100}, tmp_path)
    request_preemption(tmp_path, "SIGTERM")  # the driver itself got SIGTERM meanwhile: it exits for requeue
    assert not drained_only(drained, tmp_path)
