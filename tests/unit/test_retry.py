"""The retry decision: user errors and repeated failures end the job; other failures restart up to max_failures."""

from __future__ import annotations

from ember.errors import UserError
from ember.train.retry import USER_ERROR, Decision, Failure, decide, failure_kind


def test_a_user_error_is_never_retried() -> None:
    assert decide(Failure(USER_ERROR, 0), [], max_failures=-1) is Decision.FAIL_USER
    assert decide(Failure(USER_ERROR, 5), [Failure("RayActorError", 3)], max_failures=10) is Decision.FAIL_USER


def test_other_failures_restart_up_to_max_failures() -> None:
    history = [Failure("RayActorError", 3), Failure("RayActorError", 9)]
    assert decide(Failure("RayActorError", 12), history[:1], max_failures=2) is Decision.RETRY
    assert decide(Failure("RayActorError", 12), history, max_failures=2) is Decision.FAIL
    assert decide(Failure("RayActorError", 12), history, max_failures=-1) is Decision.RETRY
    assert decide(Failure("RayActorError", 1), [], max_failures=0) is Decision.FAIL


def test_the_same_failure_at_the_same_step_is_not_retried() -> None:
    history = [Failure("RuntimeError", 7)]
    assert decide(Failure("RuntimeError", 7), history, max_failures=-1) is Decision.FAIL
    assert decide(Failure("RuntimeError", 8), history, max_failures=-1) is Decision.RETRY
    assert decide(Failure("OSError", 7), history, max_failures=-1) is Decision.RETRY


class WorkerGroupError(Exception):
    """The shape of Ray Train v2's error: per-worker failures by rank (a real instance needs a controller)."""

    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("worker group failed")
        self.worker_failures = failures


def test_failure_kind_finds_user_errors_through_ray_wrapping() -> None:
    try:
        try:
            raise UserError("data.train.urls: bad shard")
        except UserError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as wrapped:
        assert failure_kind(WorkerGroupError({1: wrapped})) == USER_ERROR
    assert failure_kind(WorkerGroupError({0: ConnectionResetError("gloo")})) == "ConnectionResetError"
    assert failure_kind(ValueError("x")) == "ValueError"
