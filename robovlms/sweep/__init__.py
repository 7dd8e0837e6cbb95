"""Sweeps: grids and searches over backbone x formulation x data, each cell one trial of an Optuna study.

Optuna is the ledger and the queue. `prepare_sweep` validates a sweep file, expands its grid into cells and
enqueues one trial per unfinished cell in the study (SQLite in the run directory by default; a PostgreSQL URL
lets workers on many machines join). Workers pop waiting trials atomically, train the cell, evaluate it by
rollouts and commit its files (robovlms/results.py). A worker's heartbeat keeps its trial alive: when a worker
dies, its trial goes stale, is marked failed and re-enqueued, and the cell's training resumes from its last
checkpoint. A cell is recorded by the one trial that completes it; a cell that raises is recorded as failed.

Modules, one concern each:
    config.py     the sweep file's schema (SweepConfig) and load_sweep
    cells.py      grid expansion, cell ids, the checks made before any training
    study.py      the Optuna storage and study: the ledger and the queue
    search_sampler.py  a search's TPE sampler, seeded per trial so that no trial replays another's draws
    worker.py     the worker loop: pop a cell (or sample a trial), run it, tell Optuna
    one_cell.py   running one cell: train, evaluate, time a step, commit its files
    failures.py   failure records of cells that raised or whose workers died
    run.py        `robovlms sweep` / `robovlms tune`: prepare, run workers, gather, progress
    cost.py       the dry run: parameters, memory per device, where each cell runs, CPU cells' time
    startup.py    what a worker loads before its first cell, so no cell's training time absorbs it
"""

from robovlms.sweep.cells import Cell, expand_cells, fingerprint, sweep_cells
from robovlms.sweep.config import SweepConfig, load_sweep
from robovlms.sweep.cost import dry_run
from robovlms.sweep.failures import CellFailed
from robovlms.sweep.one_cell import ensure_store, run_cell, sweep_benchmark
from robovlms.sweep.run import SweepStatus, prepare_sweep, run_sweep, sweep_status
from robovlms.sweep.study import enqueue_cells, join_study, open_storage, open_study, storage_url
from robovlms.sweep.worker import prune_on_validation, work

__all__ = [
           "Cell",
           "CellFailed",
           "SweepConfig",
           "SweepStatus",
           "dry_run",
           "enqueue_cells",
           "ensure_store",
           "expand_cells",
           "fingerprint",
           "join_study",
           "load_sweep",
           "open_storage",
           "open_study",
           "prepare_sweep",
           "prune_on_validation",
           "run_cell",
           "run_sweep",
           "storage_url",
           "sweep_benchmark",
           "sweep_cells",
           "sweep_status",
           "work",
]
