"""Comparison reports of sweeps, read from sweep run directories without re-running anything.

`write_report(run_dirs, out)` writes to `out`:
    index.md, index.html    the report; the HTML embeds its plots, so the file alone renders
    <table>.csv             every table, unformatted (rates as fractions, interval bounds in their own columns)
    <plot>.png, <plot>.svg  the plots
    cells.json              every committed cell's CellResult: axes, resolved config, costs, versions
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd
from scipy.stats import binomtest

from robovlms import plots
from robovlms.benchmark import BENCHMARKS
from robovlms.errors import ReportError, UnknownNameError
from robovlms.results import (CELLS_DIR, RESULT_FILE, SWEEP_FILE, CellResult, read_cell_records,
                              read_cell_results, read_training_curve)
from robovlms.sim_to_real import PublishedAgreement, read_real_world_success, sim_to_real_agreement

CONFIDENCE = 0.95
CHAIN_LENGTH = 5  # CALVIN's protocol: chains of five subtasks
# The columns that name one configuration; seeds of a configuration are pooled into one row.
CONFIGURATION = ["backbone_label", "formulation", "history", "chunk", "data_fraction"]
RATE_COLUMNS = ["episodes", "successes", "success", "wilson_low", "wilson_high"]
BASELINE_LABELS = {"zero": "zero action (baseline)", "mean": "mean action (baseline)",
                   "replay": "demo replay (baseline)", "expert": "scripted expert (baseline)"}
HEADERS = {"backbone_label": "backbone", "data_fraction": "data fraction"}
SHOWN_CONFIGURATION = {column: column for column in CONFIGURATION}


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a success rate; unlike the normal approximation it stays in [0, 1] and is not
    empty at 0/n or n/n."""
    if n == 0:
        return math.nan, math.nan
    interval = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


# ---- reading run directories ------------------------------------------------------------------------------


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


# ---- tables ---------------------------------------------------------------------------------------------


def _rate(successes: int, episodes: int) -> dict[str, float]:
    low, high = wilson_interval(successes, episodes)
    return {"episodes": int(episodes), "successes": int(successes),
            "success": successes / episodes if episodes else math.nan, "wilson_low": low, "wilson_high": high}


def _complete(runs: SweepRuns) -> pd.DataFrame:
    return runs.cells[runs.cells.status == "complete"]


def success_table(runs: SweepRuns) -> pd.DataFrame:
    """One row per configuration (its seeds' episodes pooled) and per baseline: the success rate with its 95%
    Wilson interval, and the mean and sample standard deviation over seeds where there are several."""
    rows = []
    for key, group in _complete(runs).groupby(CONFIGURATION, sort=False):
        per_seed = group.success.astype(float)
        several = len(group) > 1
        rows.append({**dict(zip(CONFIGURATION, key)), "seeds": len(group),
                     **_rate(group.successes.sum(), group.episodes.sum()),
                     "seed_mean": per_seed.mean() if several else math.nan,
                     "seed_std": per_seed.std(ddof=1) if several else math.nan})
    return pd.DataFrame(rows, columns=[*CONFIGURATION, "seeds", *RATE_COLUMNS, "seed_mean", "seed_std"])


def breakdown_table(runs: SweepRuns, by: str) -> pd.DataFrame:
    """Success per configuration and per value of an episode column (`task`, `scene`), from the episode records.
    For chain benchmarks `task` means each subtask, over the chains that reached it."""
    episodes = _subtask_attempts(runs.episodes) if by == "task" and _chained(runs.episodes) else runs.episodes
    rows = [{**dict(zip([*CONFIGURATION, by], key)), **_rate(group.success.sum(), len(group))}
            for key, group in episodes.groupby([*CONFIGURATION, by], sort=False)] if by in episodes else []
    return pd.DataFrame(rows, columns=[*CONFIGURATION, by, *RATE_COLUMNS])


def _chained(episodes: pd.DataFrame) -> bool:
    return "subtasks_completed" in episodes and episodes.subtasks_completed.notna().any()


def _subtask_attempts(episodes: pd.DataFrame) -> pd.DataFrame:
    """One row per subtask a chain attempted: its configuration, `task` the subtask, and whether it succeeded."""
    rows = []
    for episode in episodes.dropna(subset=["subtasks_completed"]).itertuples(index=False):
        extra = json.loads(episode.extra)
        for subtask, success in zip(extra.get("subtasks", []), extra.get("subtask_success", [])):
            rows.append({**{column: getattr(episode, column) for column in CONFIGURATION}, "task": subtask,
                         "success": bool(success)})
    return pd.DataFrame(rows, columns=[*CONFIGURATION, "task", "success"])


def chain_table(runs: SweepRuns) -> pd.DataFrame:
    """Chain benchmarks: the share of episodes completing at least 1..5 subtasks in a row, and the average number
    completed. Empty when no record carries `subtasks_completed`."""
    columns = [*CONFIGURATION, "episodes", *(str(k) for k in range(1, CHAIN_LENGTH + 1)), "average_length"]
    if "subtasks_completed" not in runs.episodes:
        return pd.DataFrame(columns=columns)
    rows = []
    chained = runs.episodes.dropna(subset=["subtasks_completed"])
    for key, group in chained.groupby(CONFIGURATION, sort=False):
        completed = group.subtasks_completed.astype(int)
        rows.append({**dict(zip(CONFIGURATION, key)), "episodes": len(group),
                     **{str(k): float((completed >= k).mean()) for k in range(1, CHAIN_LENGTH + 1)},
                     "average_length": float(completed.mean())})
    return pd.DataFrame(rows, columns=columns)


def data_efficiency_table(runs: SweepRuns) -> pd.DataFrame:
    """Success per trained configuration at each fraction of training data. Empty unless there are several."""
    trained = _complete(runs)[lambda cells: cells.kind == "trained"]
    configuration = [column for column in CONFIGURATION if column != "data_fraction"]
    columns = [*configuration, "data_fraction", "seeds", *RATE_COLUMNS]
    if trained.fraction.nunique() < 2:
        return pd.DataFrame(columns=columns)
    rows = [{**dict(zip([*configuration, "data_fraction"], key)), "seeds": len(group),
             **_rate(group.successes.sum(), group.episodes.sum())}
            for key, group in trained.groupby([*configuration, "fraction"], sort=False)]
    return pd.DataFrame(rows, columns=columns)


def cost_table(runs: SweepRuns) -> pd.DataFrame:
    """Per configuration: parameters, mean training time, mean policy step latency (and its rate), success."""
    rows = []
    for key, group in _complete(runs).groupby(CONFIGURATION, sort=False):
        latency = group.step_latency_ms.astype(float).mean()
        sizes = group.backbone_size.dropna() if "backbone_size" in group else []
        rows.append({**dict(zip(CONFIGURATION, key)), "backbone_size": sizes.iloc[0] if len(sizes) else "",
                     "parameters": group.parameters.astype(float).max(),
                     "trainable_parameters": group.trainable_parameters.astype(float).max(),
                     "train_seconds": group.train_seconds.astype(float).mean(), "step_latency_ms": latency,
                     "steps_per_second": 1000 / latency if latency > 0 else math.nan,
                     **_rate(group.successes.sum(), group.episodes.sum())})
    return pd.DataFrame(rows, columns=[*CONFIGURATION, "backbone_size", "parameters", "trainable_parameters",
                                       "train_seconds",
                                       "step_latency_ms", "steps_per_second", *RATE_COLUMNS])


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
    return runs.cells[["run", "cell_id", "kind", "status", *CONFIGURATION, "seed", "trial"]].assign(
        axes=[_json(axes) for axes in runs.cells["axes"]])


def _json(axes: dict) -> str:
    return json.dumps(axes, sort_keys=True)


def versions_table(runs: SweepRuns) -> pd.DataFrame:
    """Each package's version(s) across the cells; more than one means the cells ran on different software."""
    found = pd.DataFrame([{"package": package, "version": package_version} for versions in runs.cells.versions
                          for package, package_version in versions.items()], columns=["package", "version"])
    return found.groupby("package", as_index=False).agg(versions=("version", lambda v: ", ".join(sorted(set(v)))),
                                                        cells=("version", "size"))


# ---- formatting -----------------------------------------------------------------------------------------


def configuration_label(row: pd.Series) -> str:
    """A configuration in one line: backbone · formulation · H=history · L=chunk · data fraction."""
    parts = [row.backbone_label, row.formulation, row.history and f"H={row.history}",
             row.chunk and f"L={row.chunk}", row.get("data_fraction") and f"data {row.data_fraction}"]
    return " · ".join(part for part in parts if part)


def _percent(value: float) -> str:
    return "" if pd.isna(value) else f"{value:.0%}"


def _rate_text(row: pd.Series) -> str:
    return f"{_percent(row.success)} [{_percent(row.wilson_low)}, {_percent(row.wilson_high)}]"


def _shown(frame: pd.DataFrame, columns: dict[str, object]) -> pd.DataFrame:
    """A table for reading: the given columns (a name, or a function of the row) under readable headers."""
    return _readable(pd.DataFrame({HEADERS.get(name, name): frame.apply(value, axis=1) if callable(value) else
                                   frame[value] for name, value in columns.items()}, index=frame.index))


def _readable(frame: pd.DataFrame) -> pd.DataFrame:
    """Missing values shown as blanks."""
    return frame.astype(object).where(frame.notna(), "")


def _wide(table: pd.DataFrame, by: str, cell_text) -> pd.DataFrame:
    """One row per configuration, one column per value of `by`."""
    text = table.assign(text=table.apply(cell_text, axis=1))
    keys = [key for key in CONFIGURATION if key in table and key != by]
    order = list(dict.fromkeys(text[keys].itertuples(index=False, name=None)))
    wide = text.set_index([*keys, by])["text"].unstack(by).reindex(order)
    wide.columns.name = None
    return wide.reset_index().rename(columns=HEADERS).fillna("")


def _seed_text(row: pd.Series) -> str:
    return "" if pd.isna(row.seed_mean) else f"{row.seed_mean:.0%} ± {row.seed_std:.0%}"


def _number(value: float, digits: int = 0) -> str:
    return "" if pd.isna(value) else f"{value:,.{digits}f}"


# ---- the report -----------------------------------------------------------------------------------------


@dataclass
class Table:
    name: str  # the CSV file's stem
    data: pd.DataFrame  # written to CSV
    shown: pd.DataFrame | None  # formatted for reading; None: only written to CSV


@dataclass
class Section:
    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)  # plot stems
    details: list[tuple[str, str]] = field(default_factory=list)  # (summary, JSON text), shown collapsed


def build_sections(runs: SweepRuns, out: Path, real_world: Path | None = None) -> list[Section]:
    """Every section of the report that has something to show; the plots are written to `out` on the way.
    `real_world`: real-world success rates of some configurations (SimplerEnv runs), for the sim-to-real section."""
    if runs.cells.empty:
        return [Section("No results", [f"No cell of these runs has committed its {RESULT_FILE} yet."]),
                _failed_section(runs)]
    sections = [_success_section(runs, out), _breakdown_section(runs, "task"), _sim_to_real_section(runs, real_world),
                _breakdown_section(runs, "scene"), _chain_section(runs), _data_efficiency_section(runs, out),
                _cost_section(runs, out), _training_curves_section(runs, out), _failed_section(runs),
                _configuration_section(runs), _versions_section(runs)]
    return [section for section in sections if section is not None]


def _success_section(runs: SweepRuns, out: Path) -> Section:
    section = Section("Success rate", [
        f"Benchmark {runs.benchmark}, split {runs.split}. One row per configuration; baselines (no backbone, nothing "
        "learned from images) each have their own row.",
        "successes: successes over all evaluation episodes of the row, seeds pooled; episodes is that number. "
        "[low, high] is the 95% Wilson score interval. seed mean ± std: mean and sample standard deviation of the "
        "per-seed success rates, where a row has several seeds."])
    success = success_table(runs)
    if success.empty:
        section.notes.append("No cell completed: there is no success to report.")
        return section
    section.tables.append(Table("success", success, _shown(success, {
        **SHOWN_CONFIGURATION, "seeds": "seeds", "episodes": "episodes",
        "successes": lambda row: f"{row.successes}/{row.episodes}", "success [95% CI]": _rate_text,
        "seed mean ± std": _seed_text})))
    figure = plots.success_figure([configuration_label(row) for _, row in success.iterrows()], success.success,
                                  success.wilson_low, success.wilson_high,
                                  [label in BASELINE_LABELS.values() for label in success.backbone_label])
    plots.save_figure(figure, out, "success")
    section.figures.append("success")
    return section


def _breakdown_section(runs: SweepRuns, by: str) -> Section | None:
    table = breakdown_table(runs, by)
    if table.empty:
        return None
    shown = _wide(table, by, lambda row: f"{_percent(row.success)} ({row.successes}/{row.episodes})")
    attempts = "subtask attempts (chains that reached it)" if by == "task" and _chained(runs.episodes) else "episodes"
    return Section(f"Success per {by}", [f"Split {runs.split}. Each cell: success rate (successes/{attempts} of that "
                                         f"{by}, seeds pooled)."], [Table(f"per_{by}", table, shown)])


def simulated_task_success(runs: SweepRuns) -> dict[str, dict[str, float]]:
    """{configuration label: {task: success}} from the benchmark's own per-task scores `success/<task>` (which follow
    its protocol, e.g. SimplerEnv's mean over variants), averaged over seeds. Configurations without them are left
    out."""
    rates = {}
    for _, group in _complete(runs).groupby(CONFIGURATION, sort=False):
        scores = pd.DataFrame(list(group.scores))
        per_task = {key.removeprefix("success/"): float(scores[key].mean()) for key in scores
                    if key.startswith("success/")}
        if per_task:
            rates[configuration_label(group.iloc[0])] = per_task
    return rates


def _real_world_success(path: Path, runs: SweepRuns, sim: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The real-world rates of a file, keyed by configuration label (a baseline may be named by its policy name),
    every label and task checked against the run's."""
    real = read_real_world_success(path)
    baselines = _complete(runs)[lambda cells: cells.kind == "baseline"]
    labels = {**{label: label for label in sim}, **{row.policy: configuration_label(row)
                                                    for _, row in baselines.iterrows()
                                                    if configuration_label(row) in sim}}
    tasks = dict.fromkeys(task for rates in sim.values() for task in rates)
    by_label = {}
    for name, rates in real.items():
        if name not in labels:
            raise ReportError(f"{path}: no configuration of these runs is labelled {name!r}; valid labels (as in the "
                              f"success table, or a baseline's name): {'; '.join(labels)}")
        if labels[name] in by_label:
            raise ReportError(f"{path}: {labels[name]!r} is given twice (by its label and by its baseline name)")
        unknown = [task for task in rates if task not in tasks]
        if unknown:
            raise ReportError(f"{path}: {name!r} names task {unknown[0]!r}, which these runs did not evaluate; valid "
                              f"tasks: {', '.join(tasks)}")
        by_label[labels[name]] = rates
    return by_label


def _agreement_shown(table: pd.DataFrame) -> pd.DataFrame:
    return _shown(table, {"task": "task", "policies": "policies",
                          "MMRV (lower is better)": lambda row: f"{row.mmrv:.3f}",
                          "Pearson r (higher is better)": lambda row: f"{row.pearson:.3f}"})


def _sim_to_real_section(runs: SweepRuns, real_world: Path | None) -> Section | None:
    """How well this run's simulated success per task predicts real-world success (given a file of real-world
    rates), beside the agreement its benchmark publishes for its own reference policies (SimplerEnv)."""
    sim = simulated_task_success(runs)
    tasks = list(dict.fromkeys(task for rates in sim.values() for task in rates))
    published = _published_agreement(runs, tasks)
    if real_world is None and published is None:
        return None
    section = Section("Sim-to-real agreement", [
        "How well success in simulation predicts success on the real robot, per task, over policies measured in "
        "both, as SimplerEnv computes it: MMRV, the mean maximum rank violation (for each policy, the largest "
        "real-world success gap to a policy that simulation ranks the other way, averaged over policies; 0 is best), "
        "and the Pearson correlation r of the success rates (1 is best). A task needs at least 2 policies; the row "
        "\"mean\" averages the tasks and counts the distinct policies."])
    if real_world is None:
        section.notes.append("To measure this run's agreement, give the real-world success of at least 2 of its "
                             "configurations: robovlms report RUN --out DIR --real-world real.yaml (configuration "
                             "label, as in the success table, or baseline name -> task -> success rate).")
    else:
        real = _real_world_success(real_world, runs, sim)
        pairs = pd.DataFrame([{"configuration": label, "task": task, "sim_success": sim[label][task],
                               "real_success": rate} for label, rates in real.items() for task, rate in rates.items()
                              if task in sim[label]], columns=["configuration", "task", "sim_success", "real_success"])
        agreement = sim_to_real_agreement({label: sim[label] for label in real}, real)
        section.notes.append(f"This run (the first table, then the rates it compares): the simulated success of its "
                             f"configurations (the benchmark's per-task score, seeds averaged) against the "
                             f"real-world success in {real_world}.")
        if agreement.empty:
            section.notes.append("No task has a simulated and a real-world rate for at least 2 configurations: "
                                 "nothing to compare.")
        else:
            section.tables.append(Table("sim_to_real_agreement", agreement, _agreement_shown(agreement)))
            section.tables.append(Table("sim_to_real_pairs", pairs, _shown(pairs, {
                "configuration": "configuration", "task": "task", "simulated": lambda row: _percent(row.sim_success),
                "real world": lambda row: _percent(row.real_success)})))
    if published is not None:
        section.notes.append(f"The yardstick (the last table): {published.source}'s own agreement under {runs.split} "
                             f"on this run's tasks, the published simulated success of its {len(published.policies)} "
                             f"reference policies ({', '.join(published.policies)}) against their real-world "
                             f"success.")
        section.tables.append(Table("published_sim_to_real_agreement", published.table,
                                    _agreement_shown(published.table)))
    return section


def _published_agreement(runs: SweepRuns, tasks: list[str]) -> PublishedAgreement | None:
    if runs.benchmark is None or not tasks:
        return None
    try:
        benchmark = BENCHMARKS.get(runs.benchmark)
    except UnknownNameError:  # a plugin benchmark not installed where the report is made
        return None
    return benchmark.published_agreement(runs.split, tasks)


def _chain_section(runs: SweepRuns) -> Section | None:
    chain = chain_table(runs)
    if chain.empty:
        return None
    in_a_row = {str(k): (lambda row, k=k: _percent(row[str(k)])) for k in range(1, CHAIN_LENGTH + 1)}
    shown = _shown(chain, {**SHOWN_CONFIGURATION, "episodes": "episodes", **in_a_row,
                           "average length": lambda row: f"{row.average_length:.2f}"})
    return Section("Tasks completed in a row", [
        f"Columns 1 to {CHAIN_LENGTH}: share of episodes that completed at least that many of the chain's subtasks "
        "in a row; average length: the mean number completed."], [Table("chain", chain, shown)])


def _data_efficiency_section(runs: SweepRuns, out: Path) -> Section | None:
    efficiency = data_efficiency_table(runs)
    if efficiency.empty:
        return None
    shown = _wide(efficiency.assign(data_fraction=[f"data {value:g}" for value in efficiency.data_fraction]),
                  "data_fraction", _rate_text)
    series = {configuration_label(group.iloc[0].drop("data_fraction")):
              (group.data_fraction, group.success, group.wilson_low, group.wilson_high)
              for _, group in efficiency.groupby(CONFIGURATION[:-1], sort=False)}
    plots.save_figure(plots.data_efficiency_figure(series), out, "data_efficiency")
    return Section("Data efficiency", [
        "Success (95% Wilson interval) against the fraction of training demonstrations used, seeds pooled."],
        [Table("data_efficiency", efficiency, shown)], ["data_efficiency"])


def _cost_section(runs: SweepRuns, out: Path) -> Section | None:
    cost = cost_table(runs)
    if cost.empty:
        return None
    section = Section("Cost", ["The backbone's size, parameters of the whole policy, mean training time, and the "
                               "median time of one policy step (observation in, action out), averaged over seeds."])
    section.tables.append(Table("cost", cost, _shown(cost, {
        **SHOWN_CONFIGURATION, "backbone size": "backbone_size", "parameters": lambda row: _number(row.parameters),
        "trainable": lambda row: _number(row.trainable_parameters),
        "training (s)": lambda row: _number(row.train_seconds),
        "step (ms)": lambda row: _number(row.step_latency_ms, 1),
        "steps/s (Hz)": lambda row: _number(row.steps_per_second, 1), "success [95% CI]": _rate_text})))
    timed = cost[cost.step_latency_ms > 0]
    if len(timed):
        figure = plots.latency_figure([configuration_label(row) for _, row in timed.iterrows()],
                                      timed.step_latency_ms, timed.success, timed.wilson_low, timed.wilson_high)
        plots.save_figure(figure, out, "success_vs_latency")
        section.figures.append("success_vs_latency")
    return section


def _training_curves_section(runs: SweepRuns, out: Path) -> Section | None:
    if "train/loss" not in runs.curves:
        return None
    cells = runs.cells.set_index(["run", "cell_id"])
    several_runs = runs.cells.run.nunique() > 1
    curves = {}
    for (run, cell_id), curve in runs.curves.dropna(subset=["train/loss"]).groupby(["run", "cell_id"], sort=False):
        cell = cells.loc[(run, cell_id)]
        label = f"{configuration_label(cell)} · seed {cell.seed}" + (f" · {run}" if several_runs else "")
        curves[label + (" (failed)" if cell.status != "complete" else "")] = (curve.step, curve["train/loss"])
    plots.save_figure(plots.training_curves_figure(curves), out, "training_curves")
    return Section("Training curves", ["train/loss against optimiser step, one line per trained cell (from "
                                       "Lightning's CSV log); every logged metric is in training_curves.csv."],
                   [Table("training_curves", runs.curves, None)], ["training_curves"])


def _failed_section(runs: SweepRuns) -> Section:
    failed = failed_cells_table(runs)
    if failed.empty:
        return Section("Failed cells", ["Every cell completed."])
    return Section("Failed cells", [f"{len(failed)} cell(s) did not complete."],
                   [Table("failed_cells", failed, _readable(failed.rename(columns=HEADERS)))])


def _configuration_section(runs: SweepRuns) -> Section:
    cells = configuration_table(runs)
    return Section("Configuration of every cell", [
        "Each cell's axes below; its full resolved config in the collapsed blocks and in cells.json."],
        [Table("cells", cells, _readable(cells.rename(columns=HEADERS)))],
        details=[(result.cell_id, json.dumps({"axes": result.axes, "config": result.config}, indent=2,
                                             sort_keys=True, default=str)) for result in runs.results])


def _versions_section(runs: SweepRuns) -> Section:
    versions = versions_table(runs)
    differ = versions.versions.str.contains(",").any()
    return Section("Software versions", ["Several versions in one row mean the cells ran on different software."
                                         if differ else "All cells ran on the same software."],
                   [Table("versions", versions, versions)])


def write_report(run_dirs: Iterable[str | Path], out: str | Path, real_world: Path | None = None) -> Path:
    """Read sweep run directories and write the report to `out`; returns the path of index.html. `real_world`: a
    file of real-world success rates (configuration -> task -> rate), for the run's sim-to-real agreement."""
    run_dirs = [Path(path) for path in run_dirs]
    runs = read_sweep_runs(run_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = build_sections(runs, out, real_world)
    for section in sections:
        for table in section.tables:
            table.data.to_csv(out / f"{table.name}.csv", index=False)
    (out / "cells.json").write_text(json.dumps([asdict(result) for result in runs.results], indent=2, default=str))
    complete = int((runs.cells.status == "complete").sum())
    summary = (f"{len(runs.cells)} committed cell(s) in {', '.join(str(path) for path in run_dirs)}: {complete} "
               f"complete, {len(runs.cells) - complete} failed, {len(runs.unfinished)} unfinished. Every rate is over "
               "the evaluation episodes counted in its row; every interval is a 95% Wilson score interval. Backbones "
               "trained from scratch are labelled \"random init\".")
    title = f"Sweep report: {runs.benchmark or 'no results'}" + (f", split {runs.split}" if runs.split else "")
    (out / "index.md").write_text(_markdown(title, summary, sections))
    (out / "index.html").write_text(_html(title, summary, sections, out))
    return out / "index.html"


def _markdown(title: str, summary: str, sections: list[Section]) -> str:
    blocks = [f"# {title}", summary]
    for section in sections:
        blocks += [f"## {section.title}", *section.notes]
        for table in section.tables:
            if table.shown is not None:
                blocks.append(table.shown.to_markdown(index=False, disable_numparse=True))
            blocks.append(f"CSV: [{table.name}.csv]({table.name}.csv)")
        blocks += [f"![{stem}]({stem}.png) ([SVG]({stem}.svg))" for stem in section.figures]
        blocks += [f"<details><summary>{summary_text}</summary>\n\n```json\n{text}\n```\n\n</details>"
                   for summary_text, text in section.details]
    return "\n\n".join(blocks) + "\n"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; white-space: nowrap; }
td:last-child { white-space: normal; min-width: 24em; }  /* the long free text: errors, axes */
.table-scroll { overflow-x: auto; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
pre { background: #f7f7f7; padding: 0.5em; font-size: 0.8em; overflow-x: auto; }
.note { color: #444; }
"""
# Marks <body data-images-loaded="N/M"> once the page has loaded: a headless browser can tell the plots rendered.
IMAGES_LOADED_SCRIPT = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((image) => image.complete && image.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = loaded + "/" + images.length;
});
"""


def _html(title: str, summary: str, sections: list[Section], out: Path) -> str:
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(summary)}</p>", "<ul>"]
    body += [f'<li><a href="#section-{index}">{html.escape(section.title)}</a></li>'
             for index, section in enumerate(sections)]
    body.append("</ul>")
    for index, section in enumerate(sections):
        body.append(f'<h2 id="section-{index}">{html.escape(section.title)}</h2>')
        body += [f'<p class="note">{html.escape(note)}</p>' for note in section.notes]
        for table in section.tables:
            if table.shown is not None:
                body.append(f'<div class="table-scroll">{table.shown.to_html(index=False, border=0)}</div>')
            body.append(f'<p class="note">CSV: <a href="{table.name}.csv">{table.name}.csv</a></p>')
        for stem in section.figures:
            image = base64.b64encode((out / f"{stem}.png").read_bytes()).decode()
            body.append(f'<img alt="{stem}" src="data:image/png;base64,{image}">')
        body += [f"<details><summary>{html.escape(summary_text)}</summary><pre>{html.escape(text)}</pre></details>"
                 for summary_text, text in section.details]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{HTML_STYLE}</style><script>{IMAGES_LOADED_SCRIPT}</script></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
