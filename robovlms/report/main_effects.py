"""Main effects: for each design axis that varies among a run's trained cells, success pooled over the other axes,
and which differences between its levels are resolved; and each trained configuration against each baseline.

A level's pooled rate mixes whatever else varies with it, so differences are judged on matched cells only: two
cells form a pair when they agree on every other axis and the seed. An axis nested in the compared one (whose value
each level of it sets, as the demo's formulations set their history) is not matched on but named: the comparison is
of the levels as configured. Two axes that set each other one to one (aliases) are confounded and not compared,
except a formulation and the history or frame stride each formulation was given (FORMULATION_SETTINGS): those
formulations are compared as configured too. Each trained configuration is compared with each baseline the same
way, its cells (one per seed) paired with the baseline's cell of their run.

A pair of cells is compared episode by episode on the episodes both ran, matched by identity (task, scene,
instruction, seed, and which repeat of them), and as two independent samples where its episodes cannot be matched
(a cell whose records are unreadable). The statistics, and what "resolved" means, are in comparisons.py: the main
effects are one family and the comparisons against the baselines another, each Holm-adjusted.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from robovlms.report.comparisons import ComparisonData, comparison_statistics, family_verdicts
from robovlms.report.runs import (
    ACTION_OBJECTIVE,
    DEFAULT_SETTING,
    OBJECTIVE_OPTIONS,
    PRETRAINING_AXIS,
    SweepRuns,
    complete_cells,
)
from robovlms.report.statistics import RATE_COLUMNS, rate

# The axes every trained cell has, as the report names them; further grid axes (learning_rate, ...) come from
# each cell's `axes`.
CONFIGURATION_AXES = {"backbone": "backbone_label", "formulation": "formulation",
                      "action objective": ACTION_OBJECTIVE, "history": "history", "chunk": "chunk",
                      "data_fraction": "data_fraction"}
# a seed is a replicate, not a design choice; the objective's options are the "action objective" axis
NOT_AXES = {"seed", "policy", *(f"formulation.options.{option}" for option in OBJECTIVE_OPTIONS)}
# settings a grid gives each formulation its own value of: where they alias the formulation one to one, the
# formulations are compared as configured, naming them; other aliased axes are confounded and not compared
FORMULATION_SETTINGS = ("history", "frame_stride")
EPISODE_IDENTITY = ["task", "scene", "instruction", "seed"]  # the same episode, evaluated by two cells
VERDICT_COLUMNS = ["episodes", "difference", "low", "high", "p_value", "p_holm", "resolved"]


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
    """One row per complete trained cell: run, cell_id, seed, and its level of every axis (as text). A grid axis
    that a cell's grid did not set takes the value of the cell's resolved config (a union of grids sets
    frame_stride in one grid only), or "(default)" where the config leaves it to the plugin."""
    trained = complete_cells(runs)[lambda cells: cells.kind == "trained"]
    extra = list(dict.fromkeys(axis for axes in trained["axes"] for axis in (axes or {})
                               if axis not in CONFIGURATION_AXES and axis not in NOT_AXES))
    rows = []
    for cell in trained.itertuples(index=False):
        axes = dict(cell.axes or {})
        levels = {axis: _level(getattr(cell, column) or "", axes.get(axis))
                  for axis, column in CONFIGURATION_AXES.items()}
        if PRETRAINING_AXIS in axes:  # the architecture: random init and pre-trained are the pretraining axis'
            levels["backbone"] = _level(architecture(trained, cell.backbone), axes.get("backbone"))
        for axis in extra:
            value = axes[axis] if axis in axes else _config_value(cell.config or {}, axis)
            levels[axis] = _level(value.get("name", "") if isinstance(value, dict) else value, value)
        rows.append({"run": cell.run, "cell_id": cell.cell_id, "seed": cell.seed, **levels})
    return pd.DataFrame(rows)


def architecture(trained: pd.DataFrame, backbone: str) -> str:
    """A backbone's level in a sweep with a pretraining axis, the same for its random-init and pre-trained cells
    (whose labels name their directory): "kosmos2 (tiny)" where its random-init cells are tiny ones."""
    random = trained[(trained.backbone == backbone).to_numpy() & np.array(
        [(axes or {}).get(PRETRAINING_AXIS, "none") in ("none", None) for axes in trained["axes"]], dtype=bool)]
    return f"{backbone} (tiny)" if any("tiny" in label for label in random.backbone_label) else backbone


def _config_value(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return DEFAULT_SETTING
        value = value[key]
    return value


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


def pairwise_table(runs: SweepRuns) -> pd.DataFrame:
    """Per varying axis and pair of its levels: matched pairs of cells, episodes per pair, the mean difference in
    success (a - b) with its 95% interval, its p-value, Holm-adjusted over the family of every compared pair of
    levels, whether it is resolved, and the axes nested in this one (set by it, as history by the formulation)
    that also differ between the two levels. The family's pooled pair noise is in the frame's `attrs`."""
    levels = cell_levels(runs)
    columns = ["axis", "level_a", "level_b", "matched_cells", *VERDICT_COLUMNS, "also_differs"]
    if levels.empty:
        return pd.DataFrame(columns=columns)
    outcomes = episode_outcomes(runs)
    rows, comparisons = [], []
    axes = varying_axes(levels)
    formulation_aliases = [setting for setting in FORMULATION_SETTINGS if setting in axes and "formulation" in axes
                           and _aliases(levels, setting, "formulation")]  # compared with the formulation, named
    for axis in axes:
        if axis in formulation_aliases:
            continue
        nested = [other for other in axes if other != axis and _sets(levels, axis, other)
                  and (not _aliases(levels, axis, other) or axis == "formulation" and other in formulation_aliases)]
        # matched on the axes that vary, so one that only some formulations have (the action objective) and that
        # does not vary among them does not keep those formulations from being compared
        others = [other for other in ("seed", *axes) if other not in (axis, *nested)]
        compared = _with_level(levels, axis)
        keyed = _keyed(compared, others)
        for level_a, level_b in itertools.combinations(keyed[axis].unique(), 2):
            matched = _matched_pairs(*(keyed.loc[keyed[axis] == level] for level in (level_a, level_b)))
            differs = [other for other in nested if set(levels.loc[levels[axis] == level_a, other])
                       != set(levels.loc[levels[axis] == level_b, other])]
            rows.append({"axis": axis, "level_a": level_a, "level_b": level_b, "matched_cells": len(matched),
                         "also_differs": ", ".join(differs)})
            comparisons.append(compared_pairs(outcomes, matched) if matched else None)
    return _with_verdicts(pd.DataFrame(rows, columns=[column for column in columns if column not in VERDICT_COLUMNS]),
                          comparisons, columns)


def pretraining_effect_table(runs: SweepRuns) -> pd.DataFrame:
    """Per architecture and pre-training setting: that setting against random init ("none") on the architecture's
    matched cells (the same level of every other varying axis and the same seed), each pair compared episode by
    episode; one family, Holm-adjusted over its rows. Empty without a pretraining axis."""
    levels = cell_levels(runs)
    columns = ["backbone", "pretraining", "matched_cells", *VERDICT_COLUMNS]
    if levels.empty or PRETRAINING_AXIS not in levels or "none" not in set(levels[PRETRAINING_AXIS]):
        return pd.DataFrame(columns=columns)
    outcomes = episode_outcomes(runs)
    others = [axis for axis in ("seed", *varying_axes(levels)) if axis not in ("backbone", PRETRAINING_AXIS)]
    rows, comparisons = [], []
    for backbone, cells in _keyed(levels, others).groupby("backbone", sort=False):
        random = cells[cells[PRETRAINING_AXIS] == "none"]
        for setting in [level for level in cells[PRETRAINING_AXIS].unique() if level != "none"]:
            matched = _matched_pairs(cells[cells[PRETRAINING_AXIS] == setting], random)
            rows.append({"backbone": backbone, "pretraining": setting, "matched_cells": len(matched)})
            comparisons.append(compared_pairs(outcomes, matched) if matched else None)
    return _with_verdicts(pd.DataFrame(rows, columns=[column for column in columns if column not in VERDICT_COLUMNS]),
                          comparisons, columns)


def _keyed(levels: pd.DataFrame, others: list[str]) -> pd.DataFrame:
    """The cells with a `match` key: their levels of `others`, the axes on which compared cells must agree."""
    return levels.assign(match=[json.dumps(key) for key in levels[others].astype(str).values.tolist()])


def _matched_pairs(a: pd.DataFrame, b: pd.DataFrame) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Each cell of `a` with each cell of `b` of the same `match` key, as (run, cell_id) pairs."""
    joined = a[["match", "run", "cell_id"]].merge(b[["match", "run", "cell_id"]], on="match", suffixes=("_a", "_b"))
    return [((row.run_a, row.cell_id_a), (row.run_b, row.cell_id_b)) for row in joined.itertuples()]


def baseline_comparison_table(runs: SweepRuns) -> pd.DataFrame:
    """Per trained configuration (seeds pooled) and baseline: the mean difference in success (configuration -
    baseline) with its 95% interval, p-value, Holm-adjusted over the family of every configuration and baseline,
    whether it is resolved, and whether the configuration's Wilson interval (seeds pooled) lies wholly above the
    baseline's."""
    configuration = runs.configuration
    columns = [*configuration, "baseline", "seeds", *VERDICT_COLUMNS, "interval_above"]
    cells = complete_cells(runs)
    trained, baselines = cells[cells.kind == "trained"], cells[cells.kind == "baseline"]
    if trained.empty or baselines.empty:
        return pd.DataFrame(columns=columns)
    outcomes = episode_outcomes(runs)
    rows, comparisons = [], []
    for key, group in trained.groupby(configuration, sort=False):
        pooled = rate(group.successes.sum(), group.episodes.sum())
        for label, baseline_cells in baselines.groupby("backbone_label", sort=False):
            by_run = baseline_cells.drop_duplicates("run").set_index("run")
            matched = []
            for cell in group.itertuples():  # the baseline of the cell's own run where it has one
                baseline = by_run.loc[cell.run] if cell.run in by_run.index else by_run.iloc[0]
                matched.append(((cell.run, cell.cell_id), (baseline.name, baseline.cell_id)))
            baseline_rate = rate(baseline_cells.successes.sum(), baseline_cells.episodes.sum())
            rows.append({**dict(zip(configuration, key)), "baseline": label, "seeds": len(group),
                         "interval_above": bool(pooled["wilson_low"] > baseline_rate["wilson_high"])})
            comparisons.append(compared_pairs(outcomes, matched))
    return _with_verdicts(pd.DataFrame(rows), comparisons, columns)


def _with_verdicts(table: pd.DataFrame, comparisons: list[ComparisonData | None], columns: list[str]
                   ) -> pd.DataFrame:
    """The table with each row's verdict (blank where a row has no comparison), its family's pooled pair noise
    (`pair_noise_sd`, `pair_noise_df`) and number of tests in `attrs`."""
    compared = [index for index, comparison in enumerate(comparisons) if comparison is not None]
    verdicts = pd.DataFrame(index=table.index, columns=VERDICT_COLUMNS).astype(float)
    verdicts["resolved"] = False
    attributes = {"pair_noise_df": 0.0, "pair_noise_sd": 0.0, "tests": 0}
    if compared:
        family = family_verdicts([comparison_statistics(comparisons[index]) for index in compared])
        rows = table.index[compared]
        verdicts.loc[rows, "episodes"] = [comparisons[index].episodes for index in compared]
        for column, values in (("difference", family.difference), ("low", family.low), ("high", family.high),
                               ("p_value", family.p_value), ("p_holm", family.p_holm)):
            verdicts.loc[rows, column] = values[0]
        verdicts.loc[rows, "resolved"] = family.resolved[0]
        attributes = {"pair_noise_df": family.between_pairs_df,
                      "pair_noise_sd": float(np.sqrt(family.between_pairs_variance[0])),
                      "tests": int(family.tested.sum())}
    verdicts["episodes"] = verdicts.episodes.astype("Int64")
    table = pd.concat([table, verdicts], axis=1)[columns]
    table.attrs.update(attributes)
    return table


def _sets(levels: pd.DataFrame, axis: str, other: str) -> bool:
    """Each level of `axis` comes with one level of `other`."""
    return bool(levels.groupby(axis)[other].nunique().max() == 1)


def _aliases(levels: pd.DataFrame, axis: str, other: str) -> bool:
    """The two axes set each other one to one (as pretraining.yaml's formulations and their history)."""
    return _sets(levels, axis, other) and _sets(levels, other, axis)


@dataclass
class CellOutcomes:
    """A complete cell's evaluation episodes: `success` indexed by episode identity, or, where its records are
    unreadable, only its counts."""

    successes: int
    episodes: int
    success: pd.Series | None = None


def episode_outcomes(runs: SweepRuns) -> dict[tuple[str, str], CellOutcomes]:
    """Each complete cell's outcomes; its episodes keyed by identity (EPISODE_IDENTITY, then the repeat of that
    identity within the cell) where its records could be read."""
    identity = [column for column in EPISODE_IDENTITY if column in runs.episodes]
    outcomes = {}
    for (run, cell_id), counts in _episode_counts(runs).iterrows():
        outcomes[run, cell_id] = CellOutcomes(int(counts.successes), int(counts.episodes))
    for (run, cell_id), episodes in runs.episodes.groupby(["run", "cell_id"], sort=False):
        keys = episodes[identity].assign(repeat=episodes.groupby(identity, sort=False).cumcount())
        success = pd.Series(episodes.success.to_numpy(float), index=pd.MultiIndex.from_frame(keys))
        outcomes[run, cell_id].success = success
    return outcomes


def compared_pairs(outcomes: dict[tuple[str, str], CellOutcomes],
                   pairs: list[tuple[tuple[str, str], tuple[str, str]]]) -> ComparisonData:
    """The pairs of cells as ComparisonData: episode by episode on the episodes both ran, matched by identity; as
    two independent samples where they share none (or one's records are unreadable): never by position."""
    paired, paired_cells, unpaired, unpaired_cells, episodes = [], [], [], [], []
    for a, b in pairs:
        x, y = outcomes[a], outcomes[b]
        if x.success is not None and y.success is not None:
            shared = x.success.index.intersection(y.success.index)
            if len(shared):
                paired.append((x.success.loc[shared] - y.success.loc[shared]).rename(len(paired)))
                paired_cells.append((a, b))
                episodes.append(len(shared))
                continue
        unpaired.append(_independent_difference(x, y))
        unpaired_cells.append((a, b))
        episodes.append(min(x.episodes, y.episodes))
    data = ComparisonData(episodes=min(episodes), cells=paired_cells + unpaired_cells)
    if paired:
        aligned = pd.concat(paired, axis=1)  # (E, K): NaN where a pair did not run an episode of another
        data.paired = aligned.to_numpy(float).T[None]
    if unpaired:
        difference, variance = np.array(unpaired).T
        data.unpaired_difference, data.unpaired_variance = difference[None, :], variance[None, :]
    return data


def _independent_difference(a: CellOutcomes, b: CellOutcomes) -> tuple[float, float]:
    """Difference of the two rates and its variance as independent binomial samples (conservative for cells that
    in fact ran the same episodes, whose outcomes are positively correlated)."""
    rates = [cell.successes / cell.episodes for cell in (a, b)]
    variance = sum(rate * (1 - rate) / max(cell.episodes - 1, 1) for rate, cell in zip(rates, (a, b)))
    return rates[0] - rates[1], variance
