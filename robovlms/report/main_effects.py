"""Main effects: for each design axis that varies among a run's trained cells, success pooled over the other axes,
and which differences between its levels are resolved.

A level's pooled rate mixes whatever else varies with it, so differences are judged on matched cells only: two
cells form a pair when they agree on every other axis and the seed. An axis nested in the compared one (whose value
each level of it sets, as the demo's formulations set their history) is not matched on but named: the comparison is
of the levels as configured. The difference of a pair of levels is the mean
over its matched pairs of (success of a - success of b); its 95% interval is a paired bootstrap that resamples the
matched pairs and, within each pair, the evaluation episodes (jointly where both cells ran the same episodes). A
difference is resolved when its interval excludes 0.

Each trained configuration is also compared with each baseline the same way: its cells (one per seed) paired with
the baseline's cell on the episodes both ran, since a paired comparison resolves differences that two overlapping
Wilson intervals leave open.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pandas as pd

from robovlms.report.runs import ACTION_OBJECTIVE, OBJECTIVE_OPTIONS, SweepRuns, complete_cells
from robovlms.report.statistics import RATE_COLUMNS, rate

# The axes every trained cell has, as the report names them; further grid axes (learning_rate, ...) come from
# each cell's `axes`.
CONFIGURATION_AXES = {"backbone": "backbone_label", "formulation": "formulation",
                      "action objective": ACTION_OBJECTIVE, "history": "history", "chunk": "chunk",
                      "data_fraction": "data_fraction"}
# a seed is a replicate, not a design choice; the objective's options are the "action objective" axis
NOT_AXES = {"seed", "policy", *(f"formulation.options.{option}" for option in OBJECTIVE_OPTIONS)}
BOOTSTRAP_SAMPLES = 2000
EPISODE_KEY = ["task", "scene", "seed"]  # the same episode evaluated by two cells


def _level(shown: Any, value: Any) -> str:
    """A cell's level of an axis: what the report shows for it, plus the options of a {name, options} value, e.g.
    `one-step-discrete {"decoding": "parallel"}`, less the action objective's (an axis of its own)."""
    if isinstance(value, dict):
        options = {**{key: item for key, item in value.items() if key not in ("name", "options")},
                   **{key: item for key, item in value.get("options", {}).items() if key not in OBJECTIVE_OPTIONS}}
        if options:
            return f"{shown} {json.dumps(options, sort_keys=True)}"
    return str(shown)


def cell_levels(runs: SweepRuns) -> pd.DataFrame:
    """One row per complete trained cell: run, cell_id, seed, and its level of every axis (as text)."""
    trained = complete_cells(runs)[lambda cells: cells.kind == "trained"]
    rows = []
    for cell in trained.itertuples(index=False):
        axes = dict(cell.axes or {})
        levels = {axis: _level(getattr(cell, column) or "", axes.get(axis))
                  for axis, column in CONFIGURATION_AXES.items()}
        levels.update({axis: _level(value.get("name", "") if isinstance(value, dict) else value, value)
                       for axis, value in axes.items() if axis not in CONFIGURATION_AXES and axis not in NOT_AXES})
        rows.append({"run": cell.run, "cell_id": cell.cell_id, "seed": cell.seed, **levels})
    return pd.DataFrame(rows)


def varying_axes(levels: pd.DataFrame) -> list[str]:
    return [axis for axis in levels.columns if axis not in ("run", "cell_id", "seed")
            and _with_level(levels, axis)[axis].fillna("").nunique() > 1]


def _with_level(levels: pd.DataFrame, axis: str) -> pd.DataFrame:
    """The cells that have a level of `axis`: of the action objective, those of a formulation that has one."""
    return levels[levels[axis] != ""] if axis == "action objective" else levels


def main_effects_table(runs: SweepRuns) -> pd.DataFrame:
    """Per varying axis and level: cells, and success pooled over every other axis with its Wilson interval."""
    levels = cell_levels(runs)
    columns = ["axis", "level", "cells", *RATE_COLUMNS]
    if levels.empty:
        return pd.DataFrame(columns=columns)
    counts = _episode_counts(runs)
    rows = []
    for axis in varying_axes(levels):
        for level, group in _with_level(levels.fillna({axis: ""}), axis).groupby(axis, sort=False):
            successes, episodes = counts.loc[list(zip(group.run, group.cell_id))].sum()
            rows.append({"axis": axis, "level": level, "cells": len(group), **rate(successes, episodes)})
    return pd.DataFrame(rows, columns=columns)


def _episode_counts(runs: SweepRuns) -> pd.DataFrame:
    cells = complete_cells(runs)
    return cells.set_index(["run", "cell_id"])[["successes", "episodes"]].astype(int)


def pairwise_table(runs: SweepRuns, seed: int = 0) -> pd.DataFrame:
    """Per varying axis and pair of its levels: matched pairs of cells, the mean difference in success (a - b),
    its 95% paired-bootstrap interval, whether the interval excludes 0, and the axes nested in this one (set by it,
    as history by the formulation) that also differ between the two levels."""
    levels = cell_levels(runs).fillna("")
    columns = ["axis", "level_a", "level_b", "matched_cells", "difference", "low", "high", "resolved", "also_differs"]
    if levels.empty:
        return pd.DataFrame(columns=columns)
    outcomes = _episode_outcomes(runs)
    rng = np.random.default_rng(seed)
    rows = []
    axes = varying_axes(levels)
    for axis in axes:
        nested = [other for other in axes if other != axis and _sets(levels, axis, other)
                  and not _sets(levels, other, axis)]  # one-to-one axes are aliases: no level of one is matched
        # matched on the axes that vary, so one that only some formulations have (the action objective) and that
        # does not vary among them does not keep those formulations from being compared
        others = [other for other in ("seed", *axes) if other not in (axis, *nested)]
        compared = _with_level(levels, axis)
        keyed = compared.assign(match=[json.dumps(key) for key in compared[others].astype(str).values.tolist()])
        for level_a, level_b in itertools.combinations(keyed[axis].unique(), 2):
            a, b = (keyed.loc[keyed[axis] == level, ["match", "run", "cell_id"]] for level in (level_a, level_b))
            joined = a.merge(b, on="match", suffixes=("_a", "_b"))
            matched = [((row.run_a, row.cell_id_a), (row.run_b, row.cell_id_b)) for row in joined.itertuples()]
            differs = [other for other in nested if set(levels.loc[levels[axis] == level_a, other])
                       != set(levels.loc[levels[axis] == level_b, other])]
            row = {"axis": axis, "level_a": level_a, "level_b": level_b, "matched_cells": len(matched),
                   "also_differs": ", ".join(differs)}
            if matched:
                pairs = [_paired_outcomes(outcomes[cell_a], outcomes[cell_b]) for cell_a, cell_b in matched]
                difference = float(np.mean([x.mean() - y.mean() for x, y in pairs]))
                low, high = _bootstrap_interval(pairs, rng)
                row.update(difference=difference, low=low, high=high, resolved=bool(low > 0 or high < 0))
            rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def baseline_comparison_table(runs: SweepRuns, seed: int = 0) -> pd.DataFrame:
    """Per trained configuration (seeds pooled) and baseline: the mean difference in success (configuration -
    baseline) with its 95% paired-bootstrap interval, whether it is resolved, and whether the configuration's Wilson
    interval (seeds pooled) lies wholly above the baseline's."""
    configuration = runs.configuration
    columns = [*configuration, "baseline", "difference", "low", "high", "resolved", "interval_above"]
    cells = complete_cells(runs)
    trained, baselines = cells[cells.kind == "trained"], cells[cells.kind == "baseline"]
    if trained.empty or baselines.empty:
        return pd.DataFrame(columns=columns)
    outcomes = _episode_outcomes(runs)
    rng = np.random.default_rng(seed)
    rows = []
    for key, group in trained.groupby(configuration, sort=False):
        pooled = rate(group.successes.sum(), group.episodes.sum())
        for label, baseline_cells in baselines.groupby("backbone_label", sort=False):
            by_run = baseline_cells.drop_duplicates("run").set_index("run")
            pairs = []
            for cell in group.itertuples():  # the baseline of the cell's own run where it has one
                baseline = by_run.loc[cell.run] if cell.run in by_run.index else by_run.iloc[0]
                pairs.append(_paired_outcomes(outcomes[cell.run, cell.cell_id],
                                              outcomes[baseline.name, baseline.cell_id]))
            low, high = _bootstrap_interval(pairs, rng)
            baseline_rate = rate(baseline_cells.successes.sum(), baseline_cells.episodes.sum())
            rows.append({**dict(zip(configuration, key)), "baseline": label,
                         "difference": float(np.mean([a.mean() - b.mean() for a, b in pairs])), "low": low,
                         "high": high, "resolved": bool(low > 0 or high < 0),
                         "interval_above": bool(pooled["wilson_low"] > baseline_rate["wilson_high"])})
    return pd.DataFrame(rows, columns=columns)


def _sets(levels: pd.DataFrame, axis: str, other: str) -> bool:
    """Each level of `axis` comes with one level of `other`."""
    return bool(levels.groupby(axis)[other].nunique().max() == 1)


def _episode_outcomes(runs: SweepRuns) -> dict[tuple[str, str], pd.DataFrame]:
    """Each complete cell's episodes (EPISODE_KEY, success); from its counts alone where its records are missing."""
    key = [column for column in EPISODE_KEY if column in runs.episodes]
    outcomes = {(run, cell_id): episodes[[*key, "success"]].reset_index(drop=True)
                for (run, cell_id), episodes in runs.episodes.groupby(["run", "cell_id"], sort=False)}
    for (run, cell_id), counts in _episode_counts(runs).iterrows():
        if (run, cell_id) not in outcomes:
            outcomes[run, cell_id] = pd.DataFrame({"success": np.arange(counts.episodes) < counts.successes})
    return outcomes


def _paired_outcomes(a: pd.DataFrame, b: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The two cells' successes, aligned episode by episode when both ran the same episodes (equal length then),
    otherwise as they are."""
    key = [column for column in EPISODE_KEY if column in a and column in b]
    if key and len(a) == len(b) and not a.duplicated(key).any():
        joined = a.merge(b, on=key, suffixes=("_a", "_b"))
        if len(joined) == len(a):
            return joined.success_a.to_numpy(float), joined.success_b.to_numpy(float)
    return a.success.to_numpy(float), b.success.to_numpy(float)


def _bootstrap_interval(pairs: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
                        samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """95% interval of the mean paired difference: resample pairs, then episodes within each (jointly when
    aligned)."""
    per_pair = np.empty((samples, len(pairs)))  # one resampled difference per bootstrap sample and pair
    for j, (a, b) in enumerate(pairs):
        if len(a) == len(b):
            index = rng.integers(0, len(a), (samples, len(a)))
            per_pair[:, j] = (a[index] - b[index]).mean(1)
        else:
            per_pair[:, j] = (a[rng.integers(0, len(a), (samples, len(a)))].mean(1)
                              - b[rng.integers(0, len(b), (samples, len(b)))].mean(1))
    chosen = rng.integers(0, len(pairs), (samples, len(pairs)))
    means = np.take_along_axis(per_pair, chosen, axis=1).mean(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)
