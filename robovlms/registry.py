"""Name -> constructor registries, one per axis of the design space, extended through entry points.

Built-in plugins are declared as entry points in robovlms' own pyproject.toml, exactly as a third-party
package declares its own, so the core never imports a concrete plugin by name. The three registries are declared
here with their interfaces named, not imported, so that listing them (`robovlms backbones`) imports no model code.

A plugin that fails to import, is not a complete implementation of its interface, or raises an unexpected
error while being built is a PluginError naming the plugin, its entry point and the package (distribution)
it came from, never a bare traceback; listings give such a plugin a row of its own.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from robovlms.errors import ConfigError, PluginError, RobovlmsError, UnknownNameError

if TYPE_CHECKING:
    from robovlms.backbone import Backbone
    from robovlms.benchmark import Benchmark
    from robovlms.formulation import Formulation

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

    `interface`: "module:Class", the class every plugin must subclass and implement completely (no abstract method
    left), imported when the first plugin loads; `required_attributes`: class attributes it must set (checked when
    the plugin loads, not when first used)."""

    def __init__(self, kind: str, group: str, interface: str | None = None,
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
        """Every registered name, whether or not its plugin loads (`loadable_names` for the ones that do)."""
        return sorted(set(self._registered) | set(self._entry_points()))

    def loadable_names(self) -> list[str]:
        """The names whose plugins load and implement the interface: what a user can choose from. Imports every
        plugin."""
        loadable = []
        for name in self.names():
            try:
                self.get(name)
            except PluginError:
                continue
            loadable.append(name)
        return loadable

    def _unknown_name(self, name: str) -> UnknownNameError:
        """An unknown name, listing the plugins that load as the valid choices and naming the ones that do not."""
        valid = self.loadable_names()
        error = UnknownNameError(self.kind, name, valid)
        broken = [other for other in self.names() if other not in valid]
        if broken:
            note = f"{', '.join(broken)}: installed but failing to load, see `robovlms {self.kind}s --check`"
            error.args = (f"{error.args[0]} ({note})",)
        return error

    def source(self, name: str) -> PluginSource:
        """Entry point and distribution of `name`, from metadata alone (nothing is imported)."""
        if name in self._registered:
            factory = self._registered[name]
            return PluginSource(name, f"{factory.__module__}:{factory.__qualname__}", None, None)
        entry_point = self._entry_points().get(name)
        if entry_point is None:
            raise self._unknown_name(name)
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
            raise self._unknown_name(name)
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
        module, _, attribute = self.interface.partition(":")
        interface = getattr(importlib.import_module(module), attribute)
        if not (inspect.isclass(factory) and issubclass(factory, interface)):
            return f"is {factory!r}, not a subclass of {interface.__module__}.{interface.__name__}"
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

    def listing(self, check: bool = False) -> list[dict[str, str]]:
        """One row per registered name: name, description (see `describe`), entry point, package, and `failed`
        set when the plugin cannot be used, its description then being the error.

        By default from package metadata and the plugin's source alone, imported and run by nothing (milliseconds):
        a module or class that does not exist, a syntax error or a module a plugin imports that is not installed
        are found; an error raised while importing it, or a missing abstract method, only with `check`, which
        imports each plugin and checks it against its interface (seconds: model libraries are imported)."""
        rows = []
        for source in self.sources():
            row = {"name": source.name, "entry_point": source.entry_point, "package": source.package, "failed": ""}
            try:
                if check or source.distribution is None:
                    row["description"] = describe(self.get(source.name))
                else:
                    description, problem = describe_from_source(source.entry_point)
                    if problem:
                        raise self._plugin_error(source.name, f"cannot be loaded: {problem}")
                    row["description"] = description
            except PluginError as error:
                row["description"], row["failed"] = str(error), "yes"
            rows.append(row)
        return rows

    def table(self, rows: list[dict[str, str]] | None = None, extra_columns: tuple[str, ...] = ()):
        """`rows` (default: `listing()`) as a rich table, with `extra_columns` a command added to the rows."""
        from rich.table import Table

        table = Table(title=f"{self.kind}s (entry-point group {self.group})")
        for column in ("name", "description", *extra_columns):
            table.add_column(column)
        for column in ("entry point", "package"):  # folded, never cut, on a narrow terminal
            table.add_column(column, overflow="fold")
        for row in self.listing() if rows is None else rows:
            description = f"[red]failed:[/red] {row['description']}" if row["failed"] else row["description"]
            table.add_row(row["name"], description, *(str(row.get(column, "")) for column in extra_columns),
                          row["entry_point"], row["package"])
        return table


BACKBONES: Registry[type[Backbone]] = Registry("backbone", "robovlms.backbones", "robovlms.backbone.interface:Backbone",
                                                ("name", "description", "lora_target_modules"))
FORMULATIONS: Registry[type[Formulation]] = Registry("formulation", "robovlms.formulations",
                                                      "robovlms.formulation:Formulation",
                                                      ("name", "description", "config_class"))
BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark", "robovlms.benchmarks", "robovlms.benchmark:Benchmark",
                                                  ("name",))


def _one_line(error: BaseException) -> str:
    """`KeyError: 'hidden_size'`: the error's type and the first line of its message (the traceback stays chained)."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


def _first_paragraph(text: str | None) -> str:
    return " ".join(text.strip().split("\n\n")[0].split()) if text and text.strip() else ""


def describe(factory) -> str:
    """A plugin's one-line description: the first paragraph of its own docstring, else its `description`, else
    the first paragraph of its module's docstring."""
    module = sys.modules.get(factory.__module__)
    for text in (factory.__doc__, getattr(factory, "description", None), getattr(module, "__doc__", None)):
        if _first_paragraph(text):  # a class's own docstring: __doc__ is not inherited
            return _first_paragraph(text)
    return ""


# ---- reading a plugin's description from its source, without importing it ---------------------------------------


MAX_DEPTH = 8  # how far `from x import Name` and base classes are followed into other modules


class _NoSource(Exception):
    """A module with no Python source to read (built in, frozen or compiled): described once it is imported."""


def _module_spec(name: str):
    """The spec of module `name` as the import system would find it, without running it or its parent packages
    (importlib.util.find_spec imports the parents)."""
    if name in sys.modules:
        return sys.modules[name].__spec__
    parent, _, _ = name.rpartition(".")
    path = None
    if parent:
        parent_spec = _module_spec(parent)
        if parent_spec is None or parent_spec.submodule_search_locations is None:
            return None
        path = parent_spec.submodule_search_locations
    for finder in sys.meta_path:
        spec = finder.find_spec(name, path) if hasattr(finder, "find_spec") else None
        if spec is not None:
            return spec
    return None


@dataclass
class _Source:
    """A module's parsed source, and the package its relative imports start from."""

    tree: ast.Module
    package: str

    @classmethod
    def of(cls, name: str) -> _Source:
        spec = _module_spec(name)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r}")
        source = spec.loader.get_source(name) if hasattr(spec.loader, "get_source") else None
        if source is None:
            raise _NoSource(name)
        is_package = spec.submodule_search_locations is not None
        return cls(ast.parse(source, filename=spec.origin or name), name if is_package else name.rpartition(".")[0])

    def binding(self, name: str) -> ast.stmt | None:
        """The last top-level statement that binds `name`: a class, a function, an import or an assignment."""
        found = None
        for statement in self.tree.body:
            if isinstance(statement, (ast.ClassDef, ast.FunctionDef)):
                bound = [statement.name]
            elif isinstance(statement, (ast.Import, ast.ImportFrom)):
                bound = [alias.asname or alias.name.split(".")[0] for alias in statement.names]
            elif isinstance(statement, ast.Assign):
                bound = [target.id for target in statement.targets if isinstance(target, ast.Name)]
            elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                bound = [statement.target.id]
            else:
                continue
            if name in bound:
                found = statement
        return found

    def binds_names_at_run_time(self) -> bool:
        """A star import or a module __getattr__: a name not in the source may exist once the module runs."""
        return any(isinstance(s, ast.ImportFrom) and any(alias.name == "*" for alias in s.names)
                   or isinstance(s, ast.FunctionDef) and s.name == "__getattr__" for s in self.tree.body)

    def missing_dependency(self) -> str | None:
        """The first package imported at the top of the module that is not installed (imports inside try, if or
        a function may be optional and are not looked at)."""
        for statement in self.tree.body:
            if isinstance(statement, ast.Import):
                modules = [alias.name for alias in statement.names]
            elif isinstance(statement, ast.ImportFrom) and not statement.level:
                modules = [statement.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if _module_spec(top) is None:
                    return f"ModuleNotFoundError: No module named {top!r}"
        return None

    def find_class(self, name: str, depth: int = 0) -> tuple[_Source, str, str] | None:
        """(defining module, own docstring, `description`) of class `name` as bound here, following
        `from x import name` and, for the description, base classes; None when `name` is bound otherwise."""
        statement = self.binding(name)
        if isinstance(statement, ast.ClassDef):
            return self, _first_paragraph(ast.get_docstring(statement)), self._description(statement, depth)
        if isinstance(statement, ast.ImportFrom) and depth < MAX_DEPTH:
            alias = next(alias for alias in statement.names if (alias.asname or alias.name) == name)
            module = importlib.util.resolve_name("." * statement.level + (statement.module or ""), self.package) \
                if statement.level else statement.module
            return _Source.of(module).find_class(alias.name, depth + 1)
        return None

    def _description(self, node: ast.ClassDef, depth: int) -> str:
        for statement in node.body:
            value = statement.value if isinstance(statement, (ast.Assign, ast.AnnAssign)) else None
            targets = statement.targets if isinstance(statement, ast.Assign) else \
                [statement.target] if isinstance(statement, ast.AnnAssign) else []
            if any(isinstance(target, ast.Name) and target.id == "description" for target in targets) \
                    and isinstance(value, ast.Constant) and isinstance(value.value, str):
                return _first_paragraph(value.value)
        for base in node.bases:  # `description` is inherited (a docstring is not)
            if isinstance(base, ast.Name) and depth < MAX_DEPTH:
                try:
                    found = self.find_class(base.id, depth + 1)
                except (ImportError, SyntaxError, _NoSource):
                    continue
                if found is not None and found[2]:
                    return found[2]
        return ""


def describe_from_source(entry_point: str) -> tuple[str, str | None]:
    """(description, problem) of the plugin an entry point names, as `describe` gives it once loaded, read from
    source that is neither imported nor run. `problem`, when not None, is the error importing the plugin would
    raise, as far as its source shows: a module or attribute that does not exist, a syntax error, a package it
    imports that is not installed."""
    module, _, attribute = (part.strip() for part in entry_point.partition(":"))
    attribute = attribute.split(".")[0]
    try:
        source = _Source.of(module)
    except _NoSource:
        return "", None
    except SyntaxError as error:
        return "", f"SyntaxError: {error.msg} ({error.filename}, line {error.lineno})"
    except ImportError as error:
        return "", _one_line(error)
    problem = source.missing_dependency()
    if problem is None and source.binding(attribute) is None and not source.binds_names_at_run_time():
        problem = f"AttributeError: module {module!r} has no attribute {attribute!r}"
    if problem:
        return "", problem
    try:
        found = source.find_class(attribute)
    except (ImportError, SyntaxError, _NoSource):
        found = None
    if found is None:  # bound by an assignment or a function, or imported from where its source cannot be read
        return _first_paragraph(ast.get_docstring(source.tree)), None
    defining, docstring, description = found
    return docstring or description or _first_paragraph(ast.get_docstring(defining.tree)), None
