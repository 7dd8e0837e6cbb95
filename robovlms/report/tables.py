"""The report's tables, computed from SweepRuns: unformatted data frames (rates as fractions, interval bounds in
their own columns), written to CSV as they are."""

from __future__ import annotations

import json
import math

import pandas as pd

from robovlms.report.formatting import configuration_label
from robovlms.report.runs import SweepRuns, complete_cells
from robovlms.report.statistics import RATE_COLUMNS, rate
from robovlms.results import RESULT_FILE

CHAIN_LENGTH = 5  # CALVIN's protocol: chains of five subtasks


def success_table(runs: SweepRuns) -> pd.DataFrame:
    """One row per configuration (its seeds' episodes pooled) and per baseline: the success rate with its 95%
    Wilson interval, and the mean and sample standard deviation over seeds where there are several. A row holds
    each seed once (SweepRuns keeps repeated seeds apart)."""
    configuration = runs.configuration
    rows = []
    for key, group in complete_cells(runs).groupby(configuration, sort=False):
        per_seed = group.success.astype(float)
        several = len(group) > 1
        rows.append({**dict(zip(configuration, key)), "seeds": group.seed.nunique(),
                     **rate(group.successes.sum(), group.episodes.sum()),
                     "seed_mean": per_seed.mean() if several else math.nan,
                     "seed_std": per_seed.std(ddof=1) if several else math.nan})
    return pd.DataFrame(rows, columns=[*configuration, "seeds", *RATE_COLUMNS, "seed_mean", "seed_std"])


def breakdown_table(runs: SweepRuns, by: str) -> pd.DataFrame:
    """Success per configuration and per value of an episode column (`task`, `scene`), from the episode records.
    For chain benchmarks `task` means each subtask, over the chains that reached it."""
    configuration = runs.configuration
    episodes = (_subtask_attempts(runs.episodes, configuration) if by == "task" and chained(runs.episodes)
                else runs.episodes)
    rows = [{**dict(zip([*configuration, by], key)), **rate(group.success.sum(), len(group))}
            for key, group in episodes.groupby([*configuration, by], sort=False)] if by in episodes else []
    return pd.DataFrame(rows, columns=[*configuration, by, *RATE_COLUMNS])


def chained(episodes: pd.DataFrame) -> bool:
    return "subtasks_completed" in episodes and episodes.subtasks_completed.notna().any()


def _subtask_attempts(episodes: pd.DataFrame, configuration: list[str]) -> pd.DataFrame:
    """One row per subtask a chain attempted: its configuration, `task` the subtask, and whether it succeeded."""
    rows = []
    for _, episode in episodes.dropna(subset=["subtasks_completed"]).iterrows():
        extra = json.loads(episode.extra)
        for subtask, success in zip(extra.get("subtasks", []), extra.get("subtask_success", [])):
            rows.append({**{column: episode[column] for column in configuration}, "task": subtask,
                         "success": bool(success)})
    return pd.DataFrame(rows, columns=[*configuration, "task", "success"])


def chain_table(runs: SweepRuns) -> pd.DataFrame:
    """Chain benchmarks: the share of episodes completing at least 1..5 subtasks in a row, and the average number
    completed. Empty when no record carries `subtasks_completed`."""
    configuration = runs.configuration
    columns = [*configuration, "episodes", *(str(k) for k in range(1, CHAIN_LENGTH + 1)), "average_length"]
    if "subtasks_completed" not in runs.episodes:
        return pd.DataFrame(columns=columns)
    rows = []
    chains = runs.episodes.dropna(subset=["subtasks_completed"])
    for key, group in chains.groupby(configuration, sort=False):
        completed = group.subtasks_completed.astype(int)
        rows.append({**dict(zip(configuration, key)), "episodes": len(group),
                     **{str(k): float((completed >= k).mean()) for k in range(1, CHAIN_LENGTH + 1)},
                     "average_length": float(completed.mean())})
    return pd.DataFrame(rows, columns=columns)


def data_efficiency_table(runs: SweepRuns) -> pd.DataFrame:
    """Success per trained configuration at each fraction of training data. Empty unless there are several."""
    trained = complete_cells(runs)[lambda cells: cells.kind == "trained"]
    configuration = [column for column in runs.configuration if column != "data_fraction"]
    columns = [*configuration, "data_fraction", "seeds", *RATE_COLUMNS]
    if trained.fraction.nunique() < 2:
        return pd.DataFrame(columns=columns)
    rows = [{**dict(zip([*configuration, "data_fraction"], key)), "seeds": group.seed.nunique(),
             **rate(group.successes.sum(), group.episodes.sum())}
            for key, group in trained.groupby([*configuration, "fraction"], sort=False)]
    return pd.DataFrame(rows, columns=columns)


def cost_table(runs: SweepRuns) -> pd.DataFrame:
    """Per configuration: parameters, mean training time, mean policy step latency (and its rate), success."""
    configuration = runs.configuration
    rows = []
    for key, group in complete_cells(runs).groupby(configuration, sort=False):
        latency = group.step_latency_ms.astype(float).mean()
        sizes = group.backbone_size.dropna() if "backbone_size" in group else []
        rows.append({**dict(zip(configuration, key)), "backbone_size": sizes.iloc[0] if len(sizes) else "",
                     "parameters": group.parameters.astype(float).max(),
                     "trainable_parameters": group.trainable_parameters.astype(float).max(),
                     "train_seconds": group.train_seconds.astype(float).mean(), "step_latency_ms": latency,
                     "steps_per_second": 1000 / latency if latency > 0 else math.nan, "step_timed_on": _timed_on(group),
                     **rate(group.successes.sum(), group.episodes.sum())})
    return pd.DataFrame(rows, columns=[*configuration, "backbone_size", "parameters", "trainable_parameters",
                                       "train_seconds",
                                       "step_latency_ms", "steps_per_second", "step_timed_on", *RATE_COLUMNS])


def _timed_on(group: pd.DataFrame) -> str:
    """Where the cells' policy step was timed and with how many episodes at once: "cuda:0 (NVIDIA H200), 8 at
    once"; blank for cells recorded before robovlms said so."""
    if "latency_device" not in group:
        return ""
    places = {f"{device}, {'1 episode' if batch == 1 else f'{batch:.0f} at once'}"
              for device, batch in zip(group.latency_device, group.latency_batch) if isinstance(device, str)}
    return "; ".join(sorted(places))


def failed_cells_table(runs: SweepRuns) -> pd.DataFrame:
    """Cells that failed (their axes and error) and cell directories that never committed a result."""
    failed = runs.cells[runs.cells.status != "complete"]
    failed = failed[["run", "cell_id", "status"]].assign(axes=[_json(axes) for axes in failed["axes"]],
                                                         error=failed.error)
    unfinished = runs.unfinished.assign(status="unfinished",
                                        error=f"no {RESULT_FILE}: the cell is still running or its worker died")
    return pd.concat([failed, unfinished], ignore_index=True)[failed.columns]


def configuration_table(runs: SweepRuns) -> pd.DataFrame:
    """Every committed cell: what it is, its values of the sweep's axes, and its trial."""
    return runs.cells[["run", "cell_id", "kind", "status", *runs.configuration, "seed", "trial"]].assign(
        axes=[_json(axes) for axes in runs.cells["axes"]])


def _json(axes: dict) -> str:
    return json.dumps(axes, sort_keys=True)


def versions_table(runs: SweepRuns) -> pd.DataFrame:
    """Each package's version(s) across the cells; more than one means the cells ran on different software."""
    found = pd.DataFrame([{"package": package, "version": package_version} for versions in runs.cells.versions
                          for package, package_version in versions.items()], columns=["package", "version"])
    return found.groupby("package", as_index=False).agg(versions=("version", lambda v: ", ".join(sorted(set(v)))),
                                                        cells=("version", "size"))


def simulated_task_success(runs: SweepRuns) -> dict[str, dict[str, float]]:
    """{configuration label: {task: success}} from the benchmark's own per-task scores `success/<task>` (which follow
    its protocol, e.g. SimplerEnv's mean over variants), averaged over seeds. Configurations without them are left
    out."""
    rates = {}
    for _, group in complete_cells(runs).groupby(runs.configuration, sort=False):
        scores = pd.DataFrame(list(group.scores))
        per_task = {key.removeprefix("success/"): float(scores[key].mean()) for key in scores
                    if key.startswith("success/")}
        if per_task:
            rates[configuration_label(group.iloc[0], runs.settings)] = per_task
    return rates
