"""Reading sweep run directories: every committed cell, its episodes and training curves, of one benchmark and
split."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd

from robovlms.errors import ReportError
from robovlms.results import (CELLS_DIR, RESULT_FILE, SWEEP_FILE, CellResult, read_cell_records, read_cell_results,
                              read_training_curve)

# The columns that name one configuration; seeds of a configuration are pooled into one row.
CONFIGURATION = ["backbone_label", "formulation", "history", "chunk", "data_fraction"]
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


def read_sweep_runs(run_dirs: Iterable[str | Path]) -> SweepRuns:
    paths = list(dict.fromkeys(Path(path) for path in run_dirs))
    for path in paths:
        if not (path / CELLS_DIR).is_dir() and not (path / SWEEP_FILE).is_file():
            raise ReportError(f"{path} is not a sweep run directory: it has neither {CELLS_DIR}/ nor {SWEEP_FILE}")
    names = [path.name for path in paths]
    runs = names if len(set(names)) == len(names) else [str(path) for path in paths]

    results, rows, unfinished = [], [], []
    for run, path in zip(runs, paths):
        for result in read_cell_results(path):
            results.append(result)
            rows.append({**asdict(result), "run": run, "run_dir": path})
        cell_dirs = sorted((path / CELLS_DIR).iterdir()) if (path / CELLS_DIR).is_dir() else []
        unfinished += [{"run": run, "cell_id": cell.name} for cell in cell_dirs
                       if cell.is_dir() and not (cell / RESULT_FILE).is_file()]
    cells = pd.DataFrame(rows, columns=[f.name for f in fields(CellResult)] + ["run", "run_dir"])
    benchmark = _one_value(cells, "benchmark", "benchmarks")
    split = _one_value(cells, "split", f"splits of {benchmark}")
    cells = _with_configuration(cells)

    episodes = [read_cell_records(cell.run_dir, cell.cell_id).assign(run=cell.run, cell_id=cell.cell_id)
                for cell in cells[cells.status == "complete"].itertuples()]
    episodes = pd.concat([frame for frame in episodes if len(frame)] or [pd.DataFrame(columns=["run", "cell_id"])],
                         ignore_index=True)
    episodes = episodes.merge(cells[["run", "cell_id", *CONFIGURATION]], on=["run", "cell_id"], sort=False)

    curves = [read_training_curve(cell.run_dir, cell.cell_id).assign(run=cell.run, cell_id=cell.cell_id)
              for cell in cells[cells.kind == "trained"].itertuples()]
    curves = pd.concat([frame for frame in curves if "step" in frame] or [pd.DataFrame(columns=["run", "cell_id"])],
                       ignore_index=True)
    return SweepRuns(benchmark, split, cells.drop(columns="run_dir"), episodes, curves,
                     pd.DataFrame(unfinished, columns=["run", "cell_id"]), results)


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
