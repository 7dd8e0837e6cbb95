"""A cell of several processes (one per GPU) trained in a process group of its own.

The process that calls `train` (`robovlms train`, a sweep worker) never becomes a rank: it starts one process per
device, `python -m robovlms.training CONFIG`, with its own rendezvous port, waits for them and raises what rank 0
raised. So nothing but the cell's training runs in a rank (Lightning's own launcher would re-run the whole command
line in each: a second sweep worker that claims a trial of its own), the worker never joins a process group, and a
cell's GPU memory is given back when its ranks exit.

- Ranks die with the process that started them (Linux: PR_SET_PDEATHSIG), so a killed sweep leaves no rank holding
  a GPU; the cell resumes from its last checkpoint when the sweep runs again.
- When one rank fails, the others are killed at once (they would wait in a collective until its timeout).
- `on_validation(step, metrics)` runs in the launching process: rank 0 relays each validation's metrics through a
  pipe and waits for the verdict; when the hook raises (Optuna pruning) every rank stops after that validation and
  the hook's error is raised here.
- Ranks launched by someone else (torchrun, srun: `LOCAL_RANK`, `RANK` or SLURM's task ids set) train as they are:
  that is how a cell spans several machines (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml

from robovlms.errors import RobovlmsError
from robovlms.training.config import TrainingConfig

LAUNCHER_VARIABLE = "ROBOVLMS_LAUNCHER_PID"  # set in every rank robovlms starts: the pid of the process it dies with
RELAY_VARIABLE = "ROBOVLMS_VALIDATION_RELAY"  # rank 0's ends of the validation pipes, "write,read"
SWEEP_VARIABLE = "ROBOVLMS_SWEEP_PID"  # set in each worker process a sweep starts: the pid it dies with
PR_SET_PDEATHSIG = 1

ValidationHook = Callable[[int, dict[str, float]], None]


class TrainingProcessError(RobovlmsError, RuntimeError):
    """A rank of a cell's training died of an error that is not one of robovlms' own (out of memory, a crashed
    collective) or was killed; names the rank and its error."""


def launched_externally() -> bool:
    """This process is one rank of several that something else started: robovlms' launcher, torchrun, srun."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return ("LOCAL_RANK" in os.environ or TorchElasticEnvironment.detect()
            or (SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1))


def launched_by_robovlms() -> bool:
    return LAUNCHER_VARIABLE in os.environ


def train_in_processes(config: TrainingConfig, processes: int, progress: bool,
                       on_validation: ValidationHook | None) -> None:
    """Train `config` in `processes` ranks on this machine; returns when all have finished, or raises what failed."""
    with tempfile.TemporaryDirectory(prefix="robovlms-ranks-") as scratch:
        scratch = Path(scratch)
        config_file = scratch / "config.yaml"
        config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        relay = _ValidationRelay(on_validation) if on_validation is not None else None
        environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                       "WORLD_SIZE": str(processes), "NODE_RANK": "0", LAUNCHER_VARIABLE: str(os.getpid())}
        ranks: list[subprocess.Popen] = []
        try:
            for rank in range(processes):
                command = [sys.executable, "-m", "robovlms.training", str(config_file),
                           "--report", str(scratch / f"rank{rank}.json")]
                command += ["--progress"] if progress and rank == 0 else []
                command += ["--relay"] if relay is not None else []
                rank_environment = {**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                if relay is not None and rank == 0:
                    rank_environment[RELAY_VARIABLE] = relay.child_ends
                ranks.append(subprocess.Popen(command, env=rank_environment,
                                              pass_fds=relay.child_fds if relay is not None and rank == 0 else (),
                                              stdout=None if rank == 0 else subprocess.DEVNULL))
            if relay is not None:
                relay.close_child_ends()
            failed = _wait(ranks, relay)
        finally:
            for process in ranks:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            if relay is not None:
                relay.close()
        if failed:
            _raise_rank_error(scratch, ranks, failed, config.run_dir)
        if relay is not None and relay.error is not None:
            raise relay.error


def _wait(ranks: list[subprocess.Popen], relay: _ValidationRelay | None) -> list[int]:
    """Until every rank has exited; or until some fail, when the others are killed (they would wait for them in a
    collective). Returns the ranks that failed on their own."""
    while True:
        codes = [process.poll() for process in ranks]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed or None not in codes:
            return failed
        if relay is not None:
            relay.serve(timeout=1.0)
        else:
            try:
                ranks[codes.index(None)].wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass


def _raise_rank_error(scratch: Path, ranks: list[subprocess.Popen], failed: list[int], run_dir: str) -> None:
    """The cause among the ranks that failed: a rank that raised one of robovlms' errors, else one that died without
    a word (killed: out of memory), else the first error reported (a rank whose peer died reports a broken
    collective, not the cause)."""
    reports = {rank: json.loads((scratch / f"rank{rank}.json").read_text()) for rank in failed
               if (scratch / f"rank{rank}.json").is_file()}
    own = [rank for rank, report in reports.items() if _is_robovlms_error(report["type"])]
    silent = [rank for rank in failed if rank not in reports]
    if own:
        raise _rebuilt_error(reports[own[0]], own[0], run_dir)
    if silent:
        code = ranks[silent[0]].returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        raise TrainingProcessError(f"rank {silent[0]} of the training in {run_dir} {how} (out of memory?); the "
                                   f"other ranks were stopped")
    rank = min(reports)
    raise _rebuilt_error(reports[rank], rank, run_dir)


def _error_class(name: str) -> type | None:
    module, _, attribute = name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def _is_robovlms_error(name: str) -> bool:
    error_class = _error_class(name)
    return error_class is not None and issubclass(error_class, RobovlmsError)


def _rebuilt_error(report: dict, rank: int, run_dir: str) -> Exception:
    """robovlms' own error type with the rank's message, so a sweep records and the CLI prints it as it would from
    one process; anything else is a TrainingProcessError naming it."""
    if _is_robovlms_error(report["type"]):
        error_class = _error_class(report["type"])
        error = error_class.__new__(error_class)
        error.args = (report["message"],)
        return error
    message = " ".join(report["message"].split())[:500]
    return TrainingProcessError(f"rank {rank} of the training in {run_dir} failed: {report['type']}: {message}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _ValidationRelay:
    """The launcher's end of rank 0's validation pipes: a JSON line of (step, metrics) comes in after each
    validation; "continue" or "stop" goes back. The hook's error, if it raised, is kept for the launcher."""

    def __init__(self, hook: ValidationHook):
        self.hook = hook
        self.error: BaseException | None = None
        self._from_rank, child_write = os.pipe()
        child_read, self._to_rank = os.pipe()
        self.child_fds = (child_write, child_read)
        self.child_ends = f"{child_write},{child_read}"
        self._pending = b""

    def close_child_ends(self) -> None:
        for fd in self.child_fds:
            os.close(fd)

    def serve(self, timeout: float) -> None:
        readable, _, _ = select.select([self._from_rank], [], [], timeout)
        if not readable:
            return
        chunk = os.read(self._from_rank, 1 << 16)
        if not chunk:  # rank 0 has exited: nothing more to serve
            select.select([], [], [], timeout)
            return
        self._pending += chunk
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            message = json.loads(line)
            if self.error is None:
                try:
                    self.hook(message["step"], message["metrics"])
                except BaseException as error:  # noqa: BLE001 - raised in the launcher once the ranks have stopped
                    self.error = error
            os.write(self._to_rank, b"stop\n" if self.error is not None else b"continue\n")

    def close(self) -> None:
        for fd in (self._from_rank, self._to_rank):
            try:
                os.close(fd)
            except OSError:
                pass


def relayed_validation_callback():
    """In a rank started with a relay: the Lightning callback that sends rank 0's validation metrics to the
    launcher and stops every rank when the launcher's hook said so."""
    import lightning as L

    class RelayValidation(L.Callback):
        def __init__(self):
            ends = os.environ.get(RELAY_VARIABLE)
            self.write_fd, self.read_fd = (int(fd) for fd in ends.split(",")) if ends else (None, None)

        def on_validation_end(self, trainer, module) -> None:
            stop = False
            if self.write_fd is not None:
                metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
                os.write(self.write_fd, (json.dumps({"step": trainer.global_step, "metrics": metrics}) + "\n").encode())
                reply = b""
                while not reply.endswith(b"\n"):
                    reply += os.read(self.read_fd, 64) or b"stop\n"
                stop = reply.strip() == b"stop"
            if trainer.strategy.broadcast(stop, src=0):
                trainer.should_stop = True

    return RelayValidation()


def die_with_launcher(variable: str = LAUNCHER_VARIABLE) -> None:
    """Ask the kernel to kill this process when the process that started it (its pid in `variable`) dies: a
    SIGKILLed sweep or worker. Exit now if that has already happened."""
    launcher = int(os.environ[variable])
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != launcher:
        os._exit(1)


def rank_main(argv: list[str] | None = None) -> None:
    """`python -m robovlms.training CONFIG`: one rank of a cell's training, as robovlms' launcher starts it (or
    torchrun/srun on each machine of a multi-machine cell). An error is written to --report for the launcher."""
    parser = argparse.ArgumentParser(prog="python -m robovlms.training", description=rank_main.__doc__)
    parser.add_argument("config", help="training config YAML")
    parser.add_argument("--report", help="file to write this rank's error to, for the launcher")
    parser.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    parser.add_argument("--relay", action="store_true", help="relay validations to the launcher")
    args = parser.parse_args(argv)
    if launched_by_robovlms():
        die_with_launcher()
    if not args.progress:  # a sweep's log is for its cells, not Lightning's notices of each rank
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from robovlms.training.config import load_config
    from robovlms.training.trainer import train_here

    try:
        train_here(load_config(args.config), args.progress, [relayed_validation_callback()] if args.relay else [])
    except BaseException as error:
        if args.report:
            Path(args.report).write_text(json.dumps({
                "type": f"{type(error).__module__}.{type(error).__qualname__}", "message": str(error),
                "traceback": traceback.format_exc()[-4000:]}))
        if isinstance(error, RobovlmsError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        raise
