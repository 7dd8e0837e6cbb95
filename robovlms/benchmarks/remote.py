"""A simulator in its own Python environment: robovlms' side of the simulator protocol (`robovlms.simulators.server`).

Simulators whose dependencies cannot share robovlms' environment (SimplerEnv needs numpy<2 and gymnasium<1.0, for
one) run in a subprocess of an interpreter the user names; the policy stays here. `SimulatorProcess` starts the
server with that interpreter, checks that both sides speak the same protocol version, and calls functions of module
files there; what those return that is not plain data stays in the simulator process and comes back as a
`RemoteObject`, whose methods are called over the same pipe.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import subprocess
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robovlms.errors import ConfigError, SimulatorDied, SimulatorProcessError
from robovlms.simulators.server import PROTOCOL, VERSION, ProtocolError, read_message, write_message
from robovlms.simulators.server import probe as probe_here

SERVER_FILE = Path(__file__).resolve().parents[1] / "simulators" / "server.py"
SIMULATORS_DIR = SERVER_FILE.parent
SHUTDOWN_WAIT_S = 30
OUTPUT_LINES_SHOWN = 20
CALL_TIMEOUT_S = 900  # per call; generous, for renderers that take minutes to build a scene
TIMEOUT_VARIABLE = "ROBOVLMS_SIMULATOR_TIMEOUT_S"
# What a signal that ended a simulator process says about its cause.
SIGNAL_CAUSES = {"SIGKILL": "sent from outside the process: the kernel's out-of-memory killer (see dmesg), a job "
                            "scheduler or a person",
                 "SIGSEGV": "a crash in the simulator's native code (its renderer or physics engine)",
                 "SIGBUS": "a crash in the simulator's native code (its renderer or physics engine)",
                 "SIGABRT": "the simulator's native code gave up (an assertion or an uncaught C++ exception)"}


class RemoteObject:
    """An object held by a simulator process; `remote.method(*args, **kwargs)` calls it there."""

    def __init__(self, process: SimulatorProcess, handle: int):
        self._process, self._handle = process, handle

    def __getattr__(self, method: str):
        if method.startswith("__"):
            raise AttributeError(method)

        def call(*args, **kwargs):
            return self._process.request({"op": "call", "target": self._handle, "method": method, "args": list(args),
                                          "kwargs": kwargs}, f"{method}()")

        return call


class SimulatorProcess:
    """A simulator server run by `python` (an interpreter path), started at construction, stopped by `close`.

    `environment` adds variables to the server's environment. Whatever the simulator prints goes to a log file; when
    the process dies, the error quotes what it printed during the call it died in, and the log is kept. A call not
    answered within `timeout` seconds (default $ROBOVLMS_SIMULATOR_TIMEOUT_S, else CALL_TIMEOUT_S) stops the process
    as dead (SimulatorDied): a hung simulator is the machine's or the simulator's failure, not the policy's.
    """

    def __init__(self, python: str | os.PathLike, *, environment: Mapping[str, str] | None = None,
                 server: Path = SERVER_FILE, timeout: float | None = None):
        self.python = str(python)
        self.timeout = call_timeout() if timeout is None else timeout
        if shutil.which(self.python) is None:
            raise ConfigError(f"no Python interpreter at {self.python} (benchmark option python: the interpreter of "
                              f"the simulator's environment, e.g. /opt/sim/calvin/.venv/bin/python)")
        self.log_path = Path(tempfile.mkstemp(prefix="robovlms-simulator-", suffix=".log")[1])
        with open(self.log_path, "wb") as log:
            # unbuffered pipes, so that a read waits for the server's bytes with a deadline
            self._process = subprocess.Popen([self.python, str(server)], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=log, bufsize=0,
                                             env={**os.environ, **(environment or {})})
        self._finalizer = weakref.finalize(self, _stop, self._process)
        self._ended: str | None = None  # why no more requests can be made
        self._dead = False  # ended by dying, not by close()
        self._output_from = 0  # the log's size when the current call began
        self.server_info = self._receive("start-up")
        if self.server_info.get("protocol") != PROTOCOL or self.server_info.get("version") != VERSION:
            self._finalizer()
            raise SimulatorProcessError(
                f"the simulator server {server} run by {self.python} speaks {self.server_info.get('protocol')} "
                f"version {self.server_info.get('version')}; this robovlms speaks {PROTOCOL} version {VERSION}: "
                f"run the server file of this robovlms installation")
        self.request({"op": "hello", "version": VERSION}, "the handshake")

    @property
    def pid(self) -> int:
        return self._process.pid

    def call(self, module: str | os.PathLike, function: str, *args, **kwargs) -> Any:
        """`function(*args, **kwargs)` of the module file `module`, run in the simulator process."""
        return self.request({"op": "call", "module": str(module), "function": function, "args": list(args),
                             "kwargs": kwargs}, f"{Path(module).name}:{function}()")

    @property
    def dead(self) -> bool:
        """Whether the process exited or was killed without being closed."""
        return self._dead

    def request(self, request: dict, what: str) -> Any:
        if self._ended is not None:
            raise (SimulatorDied if self._dead else SimulatorProcessError)(f"{what}: {self._ended}")
        self._output_from = self._log_size()
        try:
            write_message(self._process.stdin, request, hold=_handle_of)
        except OSError:
            raise self._died(what) from None
        except TypeError as error:
            raise ConfigError(f"{what}: {error}") from None
        answer = self._receive(what)
        if answer.get("ok"):
            return answer.get("result")
        raise _remote_error(answer, what)

    def close(self) -> None:
        """Ask the server to exit and wait for it (killing it if it does not); idempotent."""
        if self._ended is not None:
            return
        try:
            write_message(self._process.stdin, {"op": "shutdown"})
            self._receive("shutdown")
        except (SimulatorProcessError, OSError):
            pass
        self._finalizer()
        self._ended = "the simulator process was closed"
        self.log_path.unlink(missing_ok=True)

    def _receive(self, what: str) -> dict:
        try:
            return read_message(self._process.stdout, handle=lambda handle: RemoteObject(self, handle),
                                timeout=self.timeout)
        except EOFError:
            raise self._died(what) from None
        except TimeoutError:
            raise self._timed_out(what) from None
        except (ProtocolError, ValueError) as error:
            raise SimulatorProcessError(f"the simulator process ({self.python}) sent a malformed message during "
                                        f"{what}: {error}") from None

    def _timed_out(self, what: str) -> SimulatorDied:
        """Its answer may still come, and would be read as the next call's: the process is stopped."""
        self._process.kill()
        self._finalizer()
        self._ended, self._dead = (f"the simulator process ({self.python}, pid {self._process.pid}) did not answer "
                                   f"{what} within {self.timeout:g} s; it was stopped"), True
        return SimulatorDied(f"{self._ended}. A simulator that needs longer (a slow renderer) can be given more: "
                             f"{TIMEOUT_VARIABLE}=SECONDS (default {CALL_TIMEOUT_S}); its output is in {self.log_path}")

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _died(self, what: str) -> SimulatorDied:
        """The error of a process that ended during `what`: how it ended, what it printed during that call (not the
        start-up chatter before it), and where its whole output is kept."""
        try:
            code = self._process.wait(timeout=SHUTDOWN_WAIT_S)
        except subprocess.TimeoutExpired:
            code = None
        self._finalizer()
        how = f"exited with code {code}"
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            how = f"was killed by {name}" + (f" ({SIGNAL_CAUSES[name]})" if name in SIGNAL_CAUSES else "")
        self._ended, self._dead = f"the simulator process ({self.python}, pid {self._process.pid}) {how}", True
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._output_from)
                output = log.read().decode(errors="replace").splitlines()[-OUTPUT_LINES_SHOWN:]
        except OSError:  # removed by a cleaner of temporary files
            output = []
        shown = (f"its output during {what}:\n" + "\n".join(f"  | {line}" for line in output) if output else
                 f"it printed nothing during {what}")
        return SimulatorDied(f"{self._ended} during {what}; {shown}\n(its whole output: {self.log_path})")


def call_timeout() -> float:
    """Seconds a simulator call may take: $ROBOVLMS_SIMULATOR_TIMEOUT_S, else CALL_TIMEOUT_S."""
    value = os.environ.get(TIMEOUT_VARIABLE)
    if value is None:
        return CALL_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"{TIMEOUT_VARIABLE} must be a number of seconds above 0; got {value!r}")
    return seconds


def probe(python: str | os.PathLike, modules: list[str]) -> dict[str, Any]:
    """`python`'s version and numpy's, and where it would import each of `modules` from (None: it cannot), without
    importing them: {"python", "executable", "numpy", "modules": {name: path or None}}."""
    if shutil.which(str(python)) is None:
        raise ConfigError(f"no Python interpreter at {python}")
    found = subprocess.run([str(python), str(SERVER_FILE), "--probe", *modules], capture_output=True, text=True)
    if found.returncode != 0:
        last = (found.stderr.strip().splitlines() or [f"exit code {found.returncode}"])[-1]
        raise SimulatorProcessError(f"{python} cannot run the simulator server (it needs numpy): {last}")
    return json.loads(found.stdout)


def locate_modules(python: str | None, modules: list[str]) -> tuple[str, dict[str, str | None]]:
    """(the interpreter, where it finds each of `modules`): `python`'s, or this process's when None."""
    found = probe(python, modules) if python is not None else probe_here(modules)
    return found["executable"] if python is None else python, found["modules"]


def _handle_of(value) -> dict:
    if isinstance(value, RemoteObject):
        return {"__handle__": value._handle}
    raise TypeError(f"cannot send a {type(value).__name__} to the simulator process")


def _stop(process: subprocess.Popen) -> None:
    for stream in (process.stdin, process.stdout):
        try:
            stream.close()
        except OSError:
            pass
    try:
        process.wait(timeout=SHUTDOWN_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _remote_error(answer: dict, what: str) -> Exception:
    """The simulator's exception as one of Python's built-in types where it is one (an ImportError stays an
    ImportError), else a SimulatorProcessError; either way with the simulator's traceback as a note."""
    kind, message = answer.get("type", "Exception"), answer.get("error", "")
    builtin = getattr(builtins, kind, None)
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        error = builtin(message)
    else:
        error = SimulatorProcessError(f"{what} failed in the simulator process: {kind}: {message}")
    if answer.get("traceback"):
        error.add_note(f"in the simulator process:\n{answer['traceback']}")
    return error
