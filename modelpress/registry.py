"""A tiny name -> class registry, filled by decorators.

Every method (operator, allocator, cache method, compressor) is one small file that registers a
dataclass under a name; nothing dispatches through an if/elif chain.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name in self._items and self._items[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = cls
            cls.registered_name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def get(self, name: str) -> type[T]:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}"
            ) from None

    def build(self, name: str, **kwargs: Any) -> T:
        """Instantiate `name` with keyword settings, rejecting settings the method does not have."""
        cls = self.get(name)
        if dataclasses.is_dataclass(cls):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(kwargs) - known)
            if unknown:
                raise ConfigError(
                    f"{self.kind} {name!r} has no setting {', '.join(unknown)}; "
                    f"its settings are: {', '.join(sorted(known))}"
                )
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad settings for {self.kind} {name!r}: {e}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def config_dict(obj: Any) -> dict[str, Any]:
    """A registered dataclass as JSON-able data: {"name": ..., **fields}."""
    d = dataclasses.asdict(obj)
    return {"name": type(obj).registered_name, **d}
