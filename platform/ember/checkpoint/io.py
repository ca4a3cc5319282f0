"""How engines write checkpoint files: at once, or deferred (snapshot now, serialise on a thread); and
`load_file`, how every reader opens one.

Inside `deferred_writes()`, `save_file` copies every tensor of the object into host memory and records
the write instead of serialising it; the async checkpoint thread later calls `write_pending`. The loop
then stalls only for the memory copy, not for pickling and writing. The same tensor reached twice
(tied weights) is copied once, so torch.save still stores it once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from ember.errors import UserError

_pending: ContextVar[list[tuple[Any, Path]] | None] = ContextVar("ember_deferred_writes", default=None)


def save_file(obj: Any, path: Path) -> None:
    pending = _pending.get()
    if pending is None:
        write_torch_file(obj, path)
    else:
        pending.append((snapshot(obj, {}), Path(path)))


@contextlib.contextmanager
def deferred_writes() -> Iterator[list[tuple[Any, Path]]]:
    pending: list[tuple[Any, Path]] = []
    token = _pending.set(pending)
    try:
        yield pending
    finally:
        _pending.reset(token)


def snapshot(obj: Any, memo: dict[int, Any]) -> Any:
    """A copy of `obj` whose tensors live in fresh host memory (training may overwrite the originals)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().to("cpu", copy=True)
        return memo[id(obj)]
    if isinstance(obj, dict):
        return type(obj)((key, snapshot(value, memo)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(snapshot(value, memo) for value in obj)
    return obj  # numbers, strings, RNG byte states, namedtuples of those: immutable enough


def write_pending(pending: list[tuple[Any, Path]], staged_root: Path, final_root: Path) -> list[Path]:
    """Serialise recorded writes, redirected from the staging folder to the checkpoint's .tmp folder."""
    written = []
    for obj, path in pending:
        target = final_root / path.relative_to(staged_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_torch_file(obj, target)
        written.append(target)
    return written


def write_torch_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:  # through Python, so a full disk surfaces as the OSError behind it
        torch.save(obj, handle)


def load_file(path: Path, where: str = "the checkpoint", mmap: bool = False) -> Any:
    """A checkpoint file on the CPU; a missing one is a UserError: "{path}: missing from {where}"."""
    if not path.is_file():
        raise UserError(f"{path}: missing from {where}")
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
