"""Reading sweep run directories: every committed cell, its episodes and training curves, of one benchmark and
split."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd
import pyarrow

from robovlms.errors import ReportError
from robovlms.results import (CELLS_DIR, RECORDS_FILE, SWEEP_FILE, CellResult, DamagedResultError, load_cell_result,
                              read_training_curve)

# The columns that name one configuration; seeds of a configuration are pooled into one row.
CONFIGURATION = ["backbone_label", "formulation", "history", "chunk", "data_fraction"]
DAMAGED_COLUMNS = ["run", "cell_id", "status", "axes", "error"]
BASELINE_LABELS = {"zero": "zero action (baseline)", "mean": "mean action (baseline)",
                   "replay": "demo replay (baseline)", "expert": "scripted expert (baseline)"}


@dataclass
class SweepRuns:
    """The cells of one or more sweep run directories, all of one benchmark and one split."""

    benchmark: str | None  # None when no cell has committed
    split: str | None
    # One row per committed cell: CellResult fields plus `run`; the CONFIGURATION columns are display strings
    # ("" where a baseline has none), `fraction` keeps data_fraction as a number. Sorted trained first.
    cells: pd.DataFrame
    episodes: pd.DataFrame  # one row per evaluation episode of a complete cell, with its cell's CONFIGURATION
    curves: pd.DataFrame  # Lightning's logged metrics of every trained cell: run, cell_id, step, train/loss, ...
    unfinished: pd.DataFrame  # run, cell_id of cell directories without result.json
    results: list[CellResult]
    # run, cell_id, status, axes, error of cells whose files cannot be read: a damaged result.json (the cell is in
    # no other table), or a complete cell's missing or corrupt records.parquet (left out of the per-episode tables)
    damaged: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=DAMAGED_COLUMNS))


def read_sweep_runs(run_dirs: Iterable[str | Path]) -> SweepRuns:
    paths = list(dict.fromkeys(Path(path) for path in run_dirs))
    for path in paths:
        if not (path / CELLS_DIR).is_dir() and not (path / SWEEP_FILE).is_file():
            raise ReportError(f"{path} is not a sweep run directory: it has neither {CELLS_DIR}/ nor {SWEEP_FILE}")
    names = [path.name for path in paths]
    runs = names if len(set(names)) == len(names) else [str(path) for path in paths]

    results, rows, unfinished, damaged = [], [], [], []
    for run, path in zip(runs, paths):
        cell_dirs = sorted((path / CELLS_DIR).iterdir()) if (path / CELLS_DIR).is_dir() else []
        for cell in filter(Path.is_dir, cell_dirs):
            try:
                result = load_cell_result(cell)
            except DamagedResultError as error:
                damaged.append({"run": run, "cell_id": cell.name, "status": "damaged", "axes": "",
                                "error": error.reason})
                continue
            if result is None:
                unfinished.append({"run": run, "cell_id": cell.name})
                continue
            results.append(result)
            rows.append({**asdict(result), "run": run, "run_dir": path})
    cells = pd.DataFrame(rows, columns=[f.name for f in fields(CellResult)] + ["run", "run_dir"])
    benchmark = _one_value(cells, "benchmark", "benchmarks")
    split = _one_value(cells, "split", f"splits of {benchmark}")
    cells = _with_configuration(cells)

    episodes = []
    for cell in cells[cells.status == "complete"].itertuples():
        try:
            episodes.append(_cell_records(cell.run_dir / CELLS_DIR / cell.cell_id).assign(run=cell.run,
                                                                                           cell_id=cell.cell_id))
        except _UnreadableRecords as problem:
            damaged.append({"run": cell.run, "cell_id": cell.cell_id, "status": "complete, records unreadable",
                            "axes": json.dumps(cell.axes, sort_keys=True),
                            "error": f"{problem}: its episodes are left out of the per-task and per-scene tables"})
    episodes = pd.concat([frame for frame in episodes if len(frame)] or [pd.DataFrame(columns=["run", "cell_id"])],
                         ignore_index=True)
    episodes = episodes.merge(cells[["run", "cell_id", *CONFIGURATION]], on=["run", "cell_id"], sort=False)

    curves = [read_training_curve(cell.run_dir, cell.cell_id).assign(run=cell.run, cell_id=cell.cell_id)
              for cell in cells[cells.kind == "trained"].itertuples()]
    curves = pd.concat([frame for frame in curves if "step" in frame] or [pd.DataFrame(columns=["run", "cell_id"])],
                       ignore_index=True)
    return SweepRuns(benchmark, split, cells.drop(columns="run_dir"), episodes, curves,
                     pd.DataFrame(unfinished, columns=["run", "cell_id"]), results,
                     pd.DataFrame(damaged, columns=DAMAGED_COLUMNS))


class _UnreadableRecords(Exception):
    pass


def _cell_records(cell_dir: Path) -> pd.DataFrame:
    path = cell_dir / RECORDS_FILE
    if not path.is_file():
        raise _UnreadableRecords(f"{RECORDS_FILE} is missing")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise _UnreadableRecords(f"{RECORDS_FILE} is corrupt ({' '.join(str(error).split())})") from None


def _one_value(cells: pd.DataFrame, column: str, what: str) -> str | None:
    """The single benchmark (or split) of every cell; a report compares like with like, so mixtures are refused."""
    found = cells.groupby(column)["run"].unique()
    if len(found) > 1:
        listing = "; ".join(f"{value!r} in {', '.join(runs)}" for value, runs in found.items())
        raise ReportError(f"cannot report different {what} together: {listing}. Report each one separately.")
    return found.index[0] if len(found) else None


def _baseline_order(policy: str) -> int:
    return list(BASELINE_LABELS).index(policy) + 1 if policy in BASELINE_LABELS else len(BASELINE_LABELS) + 1


def _backbone_label(cell: pd.Series) -> str:
    if cell.kind == "baseline":
        return BASELINE_LABELS.get(cell.policy, f"{cell.policy} (baseline)")
    if cell.backbone_label:
        return cell.backbone_label
    if not cell.backbone:  # a failed cell: the sweep records only its axes and config
        return ""
    return f"{cell.backbone} (random init)" if cell.random_init else cell.backbone


def _with_configuration(cells: pd.DataFrame) -> pd.DataFrame:
    """Sort trained cells first, then baselines, and turn the CONFIGURATION columns into display strings."""
    cells = cells.assign(fraction=pd.to_numeric(cells.data_fraction, errors="coerce"),
                         order=[0 if kind == "trained" else _baseline_order(policy)
                                for kind, policy in zip(cells.kind, cells.policy)])
    cells["backbone_label"] = [_backbone_label(cell) for _, cell in cells.iterrows()]
    cells = cells.sort_values(["order", "backbone_label", "formulation", "history", "chunk", "fraction", "seed",
                               "run", "cell_id"], na_position="first", ignore_index=True)
    cells["formulation"] = cells.formulation.fillna("")
    for column in ("history", "chunk"):
        cells[column] = [_integer_text(value) for value in cells[column]]
    cells["data_fraction"] = ["" if pd.isna(value) else f"{value:g}" + ("" if pd.isna(per_task) else f", {per_task:g}/task")
                              for value, per_task in zip(cells.fraction, cells.episodes_per_task)]
    return cells


def _integer_text(value: object) -> str:
    return "" if pd.isna(value) else str(int(value))


def complete_cells(runs: SweepRuns) -> pd.DataFrame:
    return runs.cells[runs.cells.status == "complete"]
