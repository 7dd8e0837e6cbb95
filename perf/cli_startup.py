"""CPU time of the commands a user types first: `robovlms --help` and the plugin listings.

    python perf/cli_startup.py [--repeats 5] [--commands=--help,backbones]

Each command runs as its own process (the installed `robovlms` script next to this interpreter); what is reported
is the CPU time (user + system) the process used, from the operating system's accounting of finished children, so
other processes on a loaded machine change the wall time but hardly the CPU time. Median and range of the repeats.
Goals (issue #29): `--help` under 0.5 s, `backbones`, `benchmarks` and `formulations` under 1.5 s each; the
listings with `--check` or `--parameters` import every plugin and are shown for comparison.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROBOVLMS = Path(sys.executable).with_name("robovlms")
COMMANDS = {"--help": 0.5, "backbones": 1.5, "benchmarks": 1.5, "formulations": 1.5,
            "backbones --check": None, "formulations --check": None}


def cpu_seconds(arguments: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([str(ROBOVLMS), *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "COLUMNS": "200"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated, e.g. '--help,backbones'")
    args = parser.parse_args()
    print(f"{'command':<28} {'CPU s median':>12} {'min':>6} {'max':>6}  goal")
    for command in args.commands.split(","):
        times = [cpu_seconds(command.split()) for _ in range(args.repeats)]
        goal = COMMANDS.get(command)
        verdict = "" if goal is None else f"< {goal} s: {'met' if statistics.median(times) < goal else 'MISSED'}"
        print(f"{'robovlms ' + command:<28} {statistics.median(times):>12.2f} {min(times):>6.2f} {max(times):>6.2f}  "
              f"{verdict}", flush=True)


if __name__ == "__main__":
    main()
