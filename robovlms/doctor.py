"""`robovlms doctor`: for each benchmark, where its simulator runs (this process, or the interpreter of its own
environment), which of the modules it needs are found there, and whether it runs: a reset and one step of an
evaluation episode (`Benchmark.try_one_step`), in a child process stopped at a time limit, since a simulator that
cannot start may as well hang (a renderer waiting for a device) as fail.

Run as `python -m robovlms.doctor NAME RESULT_FILE`, the child tries benchmark NAME and writes what went wrong (or
nothing) to RESULT_FILE.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from robovlms.errors import RobovlmsError

TIME_LIMIT_S = 600  # a first SimplerEnv build on a CPU starts its renderer in 20-30 s; CALVIN's in a few seconds
OUTPUT_LINES_SHOWN = 20


@dataclass
class Diagnosis:
    """What `robovlms doctor` found for one benchmark: status "ready", "missing" (modules not found, `problem` says
    what to install) or "fails" (`problem` says how)."""

    benchmark: str
    status: str
    runs_in: str = ""
    modules: dict[str, str | None] = field(default_factory=dict)
    problem: str = ""
    seconds: float | None = None  # to build the simulator, reset it and take one step

    @property
    def ready(self) -> bool:
        return self.status == "ready"


def diagnose(name: str, time_limit_s: float = TIME_LIMIT_S) -> Diagnosis:
    """Look the benchmark's modules up where its simulator runs and, when all are found, try a reset and one step."""
    from robovlms.benchmark import create_benchmark

    try:
        installation = create_benchmark(name).installation()
    except RobovlmsError as error:
        return Diagnosis(name, "fails", problem=str(error))
    runs_in = installation.python + (" (own environment)" if installation.own_environment else " (this process)")
    if installation.missing:
        return Diagnosis(name, "missing", runs_in, installation.modules, installation.install)
    problem, seconds = try_in_child(name, time_limit_s)
    return Diagnosis(name, "fails" if problem else "ready", runs_in, installation.modules, problem, seconds)


def try_in_child(name: str, time_limit_s: float) -> tuple[str, float]:
    """(what went wrong, or "" when nothing did; seconds taken) of `Benchmark.try_one_step` for benchmark `name`, run
    by a child process in a session of its own, whose processes (a simulator's among them) are killed at the limit."""
    with tempfile.TemporaryDirectory(prefix="robovlms-doctor-") as folder:
        result = Path(folder) / "result.json"
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "robovlms.doctor", name, str(result)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        try:
            output, _ = child.communicate(timeout=time_limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            stopped = (f"it did not reset and step within the time limit of {time_limit_s:g} s, and was stopped (a "
                       f"simulator that waits for a device it cannot get hangs; --time-limit waits longer)")
            return stopped, time.monotonic() - started
        seconds = time.monotonic() - started
        if result.is_file():
            return json.loads(result.read_text())["problem"], seconds
    how = f"was killed by {signal.Signals(-child.returncode).name}" if child.returncode < 0 else \
        f"exited with code {child.returncode}"
    shown = "\n".join(f"  | {line}" for line in output.splitlines()[-OUTPUT_LINES_SHOWN:]) or "  (nothing)"
    return f"the process trying it {how} without a result; its last output:\n{shown}", seconds


def main() -> int:
    name, result = sys.argv[1:3]
    from robovlms.atomic_files import write_json_atomically
    from robovlms.benchmark import create_benchmark

    try:
        create_benchmark(name).try_one_step()
        problem = ""
    except RobovlmsError as error:
        problem = str(error)
    except Exception as error:  # noqa: BLE001 - any failure to run is what the doctor reports
        problem = "".join(traceback.format_exception(error)).strip()
    write_json_atomically(Path(result), {"problem": problem})
    return 0


if __name__ == "__main__":
    sys.exit(main())
