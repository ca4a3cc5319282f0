"""Typed name -> builder registries for models, engines and objectives (llm-foundry style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from ember.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name from the spec to the function that builds it."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorate(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(f"{self.what} {name!r} registered twice")
            self._builders[name] = builder
            return builder

        return decorate

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._builders:
            known = ", ".join(sorted(self._builders)) or "none"
            raise UserError(f"unknown {self.what} {name!r}; known: {known}")
        return self._builders[name]

    def names(self) -> list[str]:
        return sorted(self._builders)
