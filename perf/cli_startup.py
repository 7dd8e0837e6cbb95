"""CPU time of the commands a user types first: `robovlms --help` and the plugin listings.

    python perf/cli_startup.py [--repeats 5] [--commands=--help,backbones]

Each command runs as its own process (the installed `robovlms` script next to this interpreter); what is reported
is the CPU time (user + system) the process used, from the operating system's accounting of finished children, so
other processes on a loaded machine change the wall time but hardly the CPU time. Median and range of the repeats,
and two ratios against baselines measured in the same run: a bare Python process (`python -c pass`, the floor) and
one that imports the model libraries (torch, transformers, Lightning: what every command paid before the listings
read package metadata). Goals (issue #29): `--help` under 0.5 s, `backbones`, `benchmarks` and `formulations` under
1.5 s each; the listings with `--check` import every plugin and are shown for comparison.
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
BARE_PYTHON = [sys.executable, "-c", "pass"]
MODEL_IMPORTS = [sys.executable, "-c", "import torch, transformers, lightning"]


def cpu_seconds(command: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # check=False: a listing exits with 1 when an installed plugin fails to load, and its time still counts
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "COLUMNS": "200"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_cpu_seconds(command: list[str], repeats: int) -> tuple[float, float, float]:
    times = [cpu_seconds(command) for _ in range(repeats)]
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated, e.g. '--help,backbones'")
    args = parser.parse_args()
    bare, _, _ = median_cpu_seconds(BARE_PYTHON, args.repeats)
    imports, _, _ = median_cpu_seconds(MODEL_IMPORTS, args.repeats)
    print(f"baselines (CPU s, median of {args.repeats}): python -c pass {bare:.2f}, "
          f"import torch, transformers, lightning {imports:.2f}")
    print(f"{'command':<28} {'CPU s median':>12} {'min':>6} {'max':>6} {'x python':>9} {'x imports':>10}  goal")
    for command in args.commands.split(","):
        median, low, high = median_cpu_seconds([str(ROBOVLMS), *command.split()], args.repeats)
        goal = COMMANDS.get(command)
        verdict = "" if goal is None else f"< {goal} s: {'met' if median < goal else 'MISSED'}"
        print(f"{'robovlms ' + command:<28} {median:>12.2f} {low:>6.2f} {high:>6.2f} {median / bare:>9.1f} "
              f"{median / imports:>10.2f}  {verdict}", flush=True)


if __name__ == "__main__":
    main()
