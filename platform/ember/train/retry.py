"""Which training failures restart the workers: a pure decision, like Ray Train v2's failure policy.

A user's mistake (a UserError raised in a worker) fails the same way on every attempt, so it ends the job at
once with exit 2 and its message. So does a second failure of the same kind at the same step: a restart from the
same checkpoint would only replay it. Anything else (a killed worker, a lost node) restarts, up to max_failures.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ember.errors import find_user_error

USER_ERROR = "UserError"


class Decision(enum.Enum):
    RETRY = "retry"
    FAIL_USER = "fail_user"  # exit 2 with the user's message
    FAIL = "fail"  # exit 1: retries exhausted, or the same failure again


@dataclass(frozen=True)
class Failure:
    kind: str  # USER_ERROR, or the type name of the first worker's error
    step: int  # the last step the workers reported before failing


def decide(failure: Failure, history: list[Failure], max_failures: int) -> Decision:
    """`history`: the earlier failures of this job, each of which was retried; max_failures -1 is unlimited."""
    if failure.kind == USER_ERROR:
        return Decision.FAIL_USER
    if failure in history:
        return Decision.FAIL
    if max_failures != -1 and len(history) >= max_failures:
        return Decision.FAIL
    return Decision.RETRY


def failure_kind(error: BaseException) -> str:
    """USER_ERROR for a user's mistake anywhere in Ray's wrapping, else the type name of the worker's error."""
    if find_user_error(error) is not None:
        return USER_ERROR
    failures = getattr(error, "worker_failures", None) or {}
    first = next(iter(failures.values()), None) if isinstance(failures, dict) else None
    inner = first or getattr(error, "controller_failure", None) or error
    cause = getattr(inner, "cause", None)
    return type(cause if isinstance(cause, BaseException) else inner).__name__
