"""Name -> constructor registries, one per axis of the design space, extended through entry points.

Built-in plugins are declared as entry points in robovlms' own pyproject.toml, exactly as a third-party
package declares its own, so the core never imports a concrete plugin by name.

A plugin that fails to import, is not a complete implementation of its interface, or raises an unexpected
error while being built is a PluginError naming the plugin, its entry point and the package (distribution)
it came from, never a bare traceback; listings (`robovlms backbones`) give such a plugin a row of its own.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from robovlms.errors import ConfigError, PluginError, RobovlmsError, UnknownNameError

T = TypeVar("T")


def plugin_options(config_class: type, options: dict[str, Any], kind: str, name: str):
    """A plugin's options as its config dataclass, each checked against its field's type; an unknown key names the
    valid ones. `kind` and `name` ("backbone", "kosmos2") name the plugin in the errors."""
    from pydantic import TypeAdapter, ValidationError

    valid = [f.name for f in fields(config_class)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for {kind} {name!r}; "
                          f"valid options: {', '.join(valid)}")
    try:
        return TypeAdapter(config_class).validate_python(options)
    except ValidationError as error:
        problem = error.errors()[0]
        key = ".".join(str(part) for part in problem["loc"])
        raise ConfigError(f"{kind} {name!r} option {key}: {problem['msg']} (got {problem.get('input')!r})") from None


@dataclass(frozen=True)
class PluginSource:
    """Where a registered name comes from, read from package metadata without importing the plugin."""

    name: str
    entry_point: str  # "module:attribute"
    distribution: str | None  # the installed package that declares it; None when registered in code
    version: str | None

    @property
    def package(self) -> str:
        """"robovlms-llava-plugin 0.1.0", or "registered in code"."""
        return f"{self.distribution} {self.version}" if self.distribution else "registered in code"


class Registry(Generic[T]):
    """Plugins of one kind: registered in code with `register`, or found in an entry-point group.

    `interface`: the class every plugin must subclass and implement completely (no abstract method left);
    `required_attributes`: class attributes it must set (checked when the plugin loads, not when first used)."""

    def __init__(self, kind: str, group: str, interface: type | None = None,
                 required_attributes: tuple[str, ...] = ()):
        self.kind = kind
        self.group = group
        self.interface = interface
        self.required_attributes = required_attributes
        self._registered: dict[str, Callable[..., T]] = {}  # in code, with `register`
        self._loaded: dict[str, Callable[..., T]] = {}  # from entry points, once loaded and checked

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            self._registered[name] = factory
            return factory

        return decorator

    def _entry_points(self) -> dict[str, EntryPoint]:
        return {ep.name: ep for ep in entry_points(group=self.group)}

    def names(self) -> list[str]:
        return sorted(set(self._registered) | set(self._entry_points()))

    def source(self, name: str) -> PluginSource:
        """Entry point and distribution of `name`, from metadata alone (nothing is imported)."""
        if name in self._registered:
            factory = self._registered[name]
            return PluginSource(name, f"{factory.__module__}:{factory.__qualname__}", None, None)
        entry_point = self._entry_points().get(name)
        if entry_point is None:
            raise UnknownNameError(self.kind, name, self.names())
        dist = entry_point.dist
        return PluginSource(name, entry_point.value, dist.name if dist else None, dist.version if dist else None)

    def sources(self) -> list[PluginSource]:
        return [self.source(name) for name in self.names()]

    def get(self, name: str) -> Callable[..., T]:
        if name in self._registered:
            return self._registered[name]
        if name in self._loaded:
            return self._loaded[name]
        entry_point = self._entry_points().get(name)
        if entry_point is None:
            raise UnknownNameError(self.kind, name, self.names())
        try:
            factory = entry_point.load()
        except Exception as error:  # a broken plugin: an ImportError, a wrong attribute name, any import-time bug
            raise self._plugin_error(name, f"cannot be loaded: {_one_line(error)}") from error
        problem = self._interface_problem(factory)
        if problem:
            raise self._plugin_error(name, problem)
        self._loaded[name] = factory
        return factory

    def _interface_problem(self, factory) -> str | None:
        if self.interface is None:
            return None
        if not (inspect.isclass(factory) and issubclass(factory, self.interface)):
            return f"is {factory!r}, not a subclass of {self.interface.__module__}.{self.interface.__name__}"
        if inspect.isabstract(factory):
            return f"does not implement {', '.join(sorted(factory.__abstractmethods__))}"
        missing = [attribute for attribute in self.required_attributes if not hasattr(factory, attribute)]
        if missing:
            return f"does not set the class attribute(s) {', '.join(missing)}"
        return None

    def _plugin_error(self, name: str, problem: str) -> PluginError:
        source = self.source(name)
        return PluginError(f"{self.kind} plugin {name!r} ({source.entry_point}, from {source.package}) {problem}")

    @contextmanager
    def building(self, name: str) -> Iterator[None]:
        """Around a plugin's own constructor: an unexpected error becomes a PluginError naming the plugin and
        its package; robovlms' own errors (a bad option, a missing path) pass through as they are."""
        try:
            yield
        except RobovlmsError:
            raise
        except Exception as error:
            raise self._plugin_error(name, f"failed while being built: {_one_line(error)}") from error

    def create(self, name: str, *args, **kwargs) -> T:
        """`name`'s plugin built with these options; options it does not take are a ConfigError naming the valid."""
        factory = self.get(name)
        try:
            inspect.signature(factory).bind(*args, **kwargs)
        except TypeError as error:
            valid = [p for p in inspect.signature(factory).parameters if p not in ("self", "args", "kwargs")]
            raise ConfigError(f"{self.kind} {name}: {error}; its options: {', '.join(valid) or 'none'}") from None
        with self.building(name):
            return factory(*args, **kwargs)

    def listing(self) -> list[dict[str, str]]:
        """One row per registered name, from metadata and the plugin's class alone (nothing is built): name,
        description (see `describe`), entry point, package; a plugin
        that does not load has its error as description and `failed` set."""
        rows = []
        for source in self.sources():
            row = {"name": source.name, "entry_point": source.entry_point, "package": source.package, "failed": ""}
            try:
                row["description"] = describe(self.get(source.name))
            except PluginError as error:
                row["description"], row["failed"] = str(error), "yes"
            rows.append(row)
        return rows

    def table(self, rows: list[dict[str, str]] | None = None, extra_columns: tuple[str, ...] = ()):
        """`rows` (default: `listing()`) as a rich table, with `extra_columns` a command added to the rows."""
        from rich.table import Table

        table = Table(title=f"{self.kind}s (entry-point group {self.group})")
        for column in ("name", "description", *extra_columns, "entry point", "package"):
            table.add_column(column)
        for row in self.listing() if rows is None else rows:
            description = f"[red]failed:[/red] {row['description']}" if row["failed"] else row["description"]
            table.add_row(row["name"], description, *(str(row.get(column, "")) for column in extra_columns),
                          row["entry_point"], row["package"])
        return table


def _one_line(error: BaseException) -> str:
    """`KeyError: 'hidden_size'`: the error's type and the first line of its message (the traceback stays chained)."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


def describe(factory) -> str:
    """A plugin's one-line description: the first paragraph of its own docstring, else its `description`, else
    the first paragraph of its module's docstring."""
    module = sys.modules.get(factory.__module__)
    for text in (factory.__doc__, getattr(factory, "description", None), getattr(module, "__doc__", None)):
        if text and text.strip():  # a class's own docstring: __doc__ is not inherited
            return " ".join(text.strip().split("\n\n")[0].split())
    return ""
