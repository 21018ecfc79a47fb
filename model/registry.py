"""A name -> builder registry that refuses silent overwrites (as timm's does).

Two modules registering the same name is almost always a copy-paste bug; failing at import
time beats training the wrong architecture for an hour.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from model.errors import UnknownNameError

T = TypeVar("T", bound=Callable[..., object])


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(builder: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            self._items[name] = builder
            return builder

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; choose one of {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
