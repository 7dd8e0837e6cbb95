"""Name -> constructor registries, one per axis of the design space, extended through entry points.

Built-in plugins are declared as entry points in robovlms' own pyproject.toml, exactly as a third-party
package declares its own, so the core never imports a concrete plugin by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from robovlms.errors import ConfigError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Plugins of one kind: registered in code with `register`, or found in an entry-point group."""

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._registered: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            self._registered[name] = factory
            return factory

        return decorator

    def _entry_points(self) -> dict[str, EntryPoint]:
        return {ep.name: ep for ep in entry_points(group=self.group)}

    def names(self) -> list[str]:
        return sorted(set(self._registered) | set(self._entry_points()))

    def get(self, name: str) -> Callable[..., T]:
        if name in self._registered:
            return self._registered[name]
        entry_point = self._entry_points().get(name)
        if entry_point is None:
            raise UnknownNameError(self.kind, name, self.names())
        factory = entry_point.load()
        self._registered[name] = factory
        return factory

    def create(self, name: str, *args, **kwargs) -> T:
        """`name`'s plugin built with these options; options it does not take are a ConfigError naming the valid."""
        factory = self.get(name)
        try:
            inspect.signature(factory).bind(*args, **kwargs)
        except TypeError as error:
            valid = [p for p in inspect.signature(factory).parameters if p not in ("self", "args", "kwargs")]
            raise ConfigError(f"{self.kind} {name}: {error}; its options: {', '.join(valid) or 'none'}") from None
        return factory(*args, **kwargs)
