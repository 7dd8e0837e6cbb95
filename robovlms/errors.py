"""One exception type per kind of user mistake; every message names the bad value and the valid ones."""

from __future__ import annotations

from collections.abc import Iterable


class RobovlmsError(Exception):
    """Base of every error robovlms raises for a user's mistake."""


class UnknownNameError(RobovlmsError, KeyError):
    """A name (backbone, formulation, benchmark, task, scene, split ...) that does not exist."""

    def __init__(self, kind: str, name: object, valid: Iterable[object]):
        self.kind, self.name, self.valid = kind, name, sorted(str(v) for v in valid)
        super().__init__(f"unknown {kind} {name!r}; valid choices: {', '.join(self.valid) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class StoreError(RobovlmsError):
    """An episode store that is missing, half-written, of another schema version, or would be overwritten."""


class WindowError(RobovlmsError, ValueError):
    """A training window (history H, chunk L) that no episode of a store can serve."""


class ConfigError(RobovlmsError, ValueError):
    """A configuration value that is malformed or out of range."""


class MissingDependencyError(RobovlmsError, ImportError):
    """An optional package is needed; the message says exactly what to install."""


class PluginError(RobovlmsError):
    """A plugin (backbone, formulation, benchmark) that cannot be loaded, does not implement its interface, or
    fails while being built; names the plugin, its entry point and the package it came from."""


class HiddenSizeError(PluginError, ValueError):
    """A backbone whose forward returns hidden states of another width than its `hidden_size` says."""


class SimulatorProcessError(RobovlmsError, RuntimeError):
    """A simulator run in its own Python environment that died, speaks another protocol version, or sent a malformed
    message; the message says which process and quotes its last output."""


class LedgerError(RobovlmsError):
    """A sweep's Optuna storage (its ledger) that cannot be written or read mid-sweep: a full disk, a database server
    gone; what was committed is kept, and the sweep resumes when run again."""


class SimulatorDied(SimulatorProcessError):
    """A simulator process that exited or was killed in the middle of the evaluation: a failure of the machine or the
    simulator, not of the policy (a sweep retries the cell)."""


class ShapeError(RobovlmsError, ValueError):
    """A tensor (an image batch, suffix embeddings) whose shape or dtype is not the one expected; names both."""


class ReportError(RobovlmsError, ValueError):
    """Sweep run directories that cannot be reported: not a run directory, or runs that are not comparable
    (different benchmarks or splits)."""


def config_error(what: str, model, error) -> ConfigError:
    """A ConfigError from a pydantic ValidationError of `model`: each problem names its key and, for an unknown
    key, the valid ones."""
    return ConfigError(f"{what}:\n" + "\n".join(_describe(model, problem) for problem in error.errors()))


def _describe(model, problem: dict) -> str:
    location = ".".join(str(part) for part in problem["loc"])
    for part in problem["loc"][:-1]:
        annotation = model.model_fields[part].annotation if part in getattr(model, "model_fields", {}) else None
        annotation = next((a for a in getattr(annotation, "__args__", ()) if hasattr(a, "model_fields")), annotation)
        model = annotation if hasattr(annotation, "model_fields") else model
    if problem["type"] == "extra_forbidden":
        return f"  unknown key {location!r}; valid keys: {', '.join(model.model_fields)}"
    if problem["type"] == "missing":
        return f"  missing key {location!r}"
    return f"  {location}: {problem['msg']} (got {problem.get('input')!r})"
