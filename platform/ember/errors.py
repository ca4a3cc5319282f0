"""The two kinds of failure ember distinguishes: what the user can fix, and what is our bug.

Both survive pickling, because they cross Ray process boundaries on their way to the CLI.
"""

from __future__ import annotations

RESUMABLE_EXIT_CODE = 75  # EX_TEMPFAIL: preempted after a committed checkpoint; schedulers may requeue


class UserError(Exception):
    """A mistake the user can fix (bad spec, missing file, wrong flag). The CLI exits 2 with the message."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message


class InternalError(Exception):
    """An invariant ember itself broke. The CLI exits 1 and shows the context."""

    exit_code = 1

    def __reduce__(self):
        return (type(self), self.args)


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The first UserError in an exception's cause/context chain (Ray wraps worker errors several times)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        stack.extend([current.__cause__, current.__context__])
        # Ray's RayTaskError keeps the original exception on `.cause`; Train V2 keeps per-worker errors.
        stack.append(getattr(current, "cause", None))
        failures = getattr(current, "worker_failures", None) or {}
        stack.extend(failures.values() if isinstance(failures, dict) else [])
        stack.append(getattr(current, "controller_failure", None))
    return None
