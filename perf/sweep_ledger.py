"""The sweep ledger's overhead per cell, at 100, 1,000 and 10,000 cells, on SQLite and PostgreSQL.

    python perf/sweep_ledger.py [--cells 100 1000 10000] [--pops 50] [--storages SQLite PostgreSQL]

Cells do nothing (run_cell is replaced by a no-op), so what is timed is the ledger alone: failing stale trials,
popping a waiting trial, telling Optuna, and the progress report the sweep process makes after every cell (without
its one-second throttle). Measured twice per size: at the start of the sweep (every cell waiting) and near its end
(all but the last cells complete). Target: flat in the number of cells, under 50 ms per cell at 10,000 cells.
PostgreSQL is a server of our own on a loopback port (as tests/test_sweep.py starts one), from
/usr/lib/postgresql/15/bin.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import optuna
import sqlalchemy
from optuna.trial import TrialState

import robovlms.sweep.worker
from robovlms.sweep import Cell, enqueue_cells, load_sweep, open_storage, work
from robovlms.sweep.run import ledger_status
from robovlms.sweep.study import ledger_tables

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


class Enough(Exception):  # noqa: N818
    """Stops the worker after the cells to time."""


def no_op_cell(sweep, cell, run_dir, **kwargs):
    return SimpleNamespace(success=1.0, successes=1, episodes=1)


@contextmanager
def postgres_server():
    directory = Path(tempfile.mkdtemp(prefix="robovlms-perf-postgres-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(directory, "postgres")
    subprocess.run([*as_postgres, POSTGRES_BIN / "initdb", "-D", directory / "data", "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    control = [*as_postgres, POSTGRES_BIN / "pg_ctl", "-D", directory / "data"]
    subprocess.run([*control, "-o", f"-p {port} -k {directory} -c listen_addresses=127.0.0.1",
                    "-l", directory / "log", "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*control, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


def seconds_per_pop(url: str, cells: int, pops: int, run_dir: Path, late: bool) -> float:
    """Mean wall time per cell of `pops` no-op cells taken by one worker from a study of `cells` cells."""
    name = f"ledger-{cells}-{'late' if late else 'early'}"
    sweep = load_sweep({"name": name, "run_dir": str(run_dir), "store": {"path": "-"}, "baselines": [],
                        "heartbeat_seconds": 30})
    grid = [Cell(f"cell-{index:05d}", "trained") for index in range(cells)]
    storage = open_storage(url, sweep.heartbeat_seconds)
    study = optuna.create_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    enqueue_cells(study, grid, run_dir)
    if late:  # all but the last cells complete, as a sweep near its end
        trials, study_id = ledger_tables()["trials"], storage.get_study_id_from_name(name)
        with storage.engine.begin() as connection:
            last = connection.execute(sqlalchemy.select(trials.c.trial_id).where(trials.c.study_id == study_id)
                                      .order_by(trials.c.trial_id.desc()).limit(pops)).scalars().all()
            connection.execute(trials.update().where(trials.c.study_id == study_id, trials.c.trial_id.not_in(last))
                               .values(state=TrialState.COMPLETE.name))
    robovlms.sweep.worker.run_cell = no_op_cell
    done = [0]

    def report() -> None:
        ledger_status(study, grid)
        done[0] += 1
        if done[0] == pops:
            raise Enough

    started = time.perf_counter()
    try:
        work(study, sweep, grid, run_dir, "grid", on_change=report)
    except Enough:
        pass
    elapsed = time.perf_counter() - started
    assert ledger_status(study, grid).done == (cells if late else pops)
    return elapsed / pops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100, 1000, 10_000])
    parser.add_argument("--pops", type=int, default=50)
    parser.add_argument("--storages", nargs="+", choices=["SQLite", "PostgreSQL"], default=["SQLite", "PostgreSQL"])
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, (
            postgres_server() if "PostgreSQL" in arguments.storages else nullcontext()) as postgres:
        urls = {"SQLite": f"sqlite:///{directory}/optuna.db", "PostgreSQL": postgres}
        storages = {label: urls[label] for label in arguments.storages}
        print(f"{'storage':<12}{'cells':>8}{'ms/cell, start':>17}{'ms/cell, end':>15}")
        for label, url in storages.items():
            for cells in arguments.cells:
                run_dir = Path(directory) / f"{label}-{cells}"
                early = seconds_per_pop(url, cells, arguments.pops, run_dir, late=False)
                late = seconds_per_pop(url, cells, arguments.pops, run_dir, late=True)
                print(f"{label:<12}{cells:>8}{early * 1000:>17.1f}{late * 1000:>15.1f}", flush=True)


if __name__ == "__main__":
    main()
