"""What a conformance kit reports: one result per check, each a pass, a failure or a skip with a one-line reason."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from robovlms.errors import PluginError

TOLERANCE = 1e-5  # between computations that should agree up to float rounding


class SkipCheck(Exception):
    """A check that does not apply to this plugin (a backbone with no wrapped transformers forward to compare with)."""


@dataclass
class CheckResult:
    check: str
    status: str  # "pass" | "fail" | "skip"
    reason: str  # one line
    error: Exception | None = field(default=None, repr=False, compare=False)  # what a failed check raised

    @property
    def passed(self) -> bool:
        return self.status != "fail"


def run_check(check: str, function: Callable[..., str], *arguments) -> CheckResult:
    """`function(*arguments)`: its summary when it passes; its AssertionError's reason when it fails; the message of
    robovlms' own error about the plugin (a PluginError, one line naming it: a backbone's forward of the wrong width);
    for any other error (the plugin crashed inside the check), the error's first line and where it was raised."""
    try:
        return CheckResult(check, "pass", function(*arguments))
    except SkipCheck as skip:
        return CheckResult(check, "skip", str(skip))
    except AssertionError as failure:
        return CheckResult(check, "fail", str(failure), failure)
    except PluginError as error:
        return CheckResult(check, "fail", str(error), error)
    except Exception as error:  # noqa: BLE001 (the plugin crashed inside the check: say where)
        first_line = (str(error).splitlines() or [""])[0]
        return CheckResult(check, "fail", f"{type(error).__name__}: {first_line} ({_where(error)})", error)


def _where(error: Exception) -> str:
    """Where the plugin's (or robovlms') call failed, rather than the library line that raised: the innermost frame
    outside torch and transformers, as its module's path and line (`gru_broken/__init__.py:23`, not `__init__.py:23`,
    which every package has)."""
    libraries = tuple(str(Path(module.__file__).parent) for name in ("torch", "transformers")
                      if (module := sys.modules.get(name)) is not None)
    frames = [(tb.tb_frame, tb.tb_lineno) for tb in _tracebacks(error.__traceback__)]
    frame, line = next(((frame, line) for frame, line in reversed(frames)
                        if not frame.f_code.co_filename.startswith(libraries)), frames[-1])
    return f"{_module_path(frame.f_code.co_filename, frame.f_globals.get('__name__', ''))}:{line}"


def _tracebacks(tb: types.TracebackType | None):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _module_path(filename: str, module: str) -> str:
    """`filename` as the path of `module` inside its package (`robovlms/formulations/policy_head.py`)."""
    name = Path(filename).name
    packages = module.split(".") if name == "__init__.py" else module.split(".")[:-1]
    return "/".join([*packages, name]) if module and module != "__main__" else name


def close(a: torch.Tensor, b: torch.Tensor, tolerance: float = TOLERANCE) -> bool:
    return torch.allclose(a, b, atol=tolerance, rtol=tolerance)


def differ(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"differ by up to {(a - b).abs().max().item():.2g}"


def fail(reason: str) -> None:
    raise AssertionError(reason)
