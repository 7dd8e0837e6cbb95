"""Sim-to-real agreement: how well success in simulation ranks and tracks success on the real robot.

SimplerEnv (Li et al. 2024, arXiv 2405.05941) judges a simulated evaluation by policies evaluated both in simulation
and in the real world, one task at a time, with two metrics:
    mean maximum rank violation (MMRV)  lower is better; 0 when simulation orders the policies as the real world does
    Pearson correlation                 higher is better; 1 when simulated success is a linear function of real
Both follow simpler_env/utils/metrics.py. `sim_to_real_agreement` computes them for any policies and tasks; a report
computes them for the cells of a run given a file of real-world rates (`read_real_world_success`), beside the
agreement a benchmark publishes for its own reference policies (`Benchmark.published_agreement`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from robovlms.errors import ConfigError, ReportError
from robovlms.yaml_files import read_yaml_mapping

AGREEMENT_COLUMNS = ["task", "policies", "mmrv", "pearson"]
MEAN_ROW = "mean"


@dataclass
class PublishedAgreement:
    """The agreement a benchmark's authors publish for their reference policies: the yardstick for a run's own."""

    table: pd.DataFrame  # as sim_to_real_agreement's
    policies: list[str]  # the reference policies behind it
    source: str  # who published it, e.g. SimplerEnv


def _rates(real: Sequence[float], sim: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Both sequences as float arrays, checked: one rate per policy in each, at least two policies, in [0, 1]."""
    real, sim = np.asarray(real, dtype=float), np.asarray(sim, dtype=float)
    if real.ndim != 1 or real.shape != sim.shape:
        raise ConfigError(f"real and sim need one success rate per policy each, in the same order; got shapes "
                          f"{real.shape} and {sim.shape}")
    if len(real) < 2:
        raise ConfigError(f"sim-to-real agreement compares policies: it needs at least 2, got {len(real)}")
    for name, rates in (("real", real), ("sim", sim)):
        bad = rates[~((rates >= 0) & (rates <= 1))]  # NaN fails both comparisons
        if len(bad):
            raise ConfigError(f"{name} success rates must lie in [0, 1]; got {bad[0]!r}")
    return real, sim


def mean_maximum_rank_violation(real: Sequence[float], sim: Sequence[float]) -> float:
    """SimplerEnv's MMRV of simulated success rates `sim` against real-world ones `real` (one per policy, same order).

    A policy's worst rank violation is the largest real-world gap |real_i - real_j| over the policies j that
    simulation orders differently from the real world, (sim_i > sim_j) != (real_i > real_j); MMRV is its mean over
    policies. Ties as in SimplerEnv: a pair tied in sim but not in real is a violation (at the policy that is better
    in real), a pair tied in real costs nothing (its gap is 0).

    Argument order is real first, as in SimplerEnv's README; its function takes (perf_sim, perf_real). Either way
    the violations are weighted by real-world gaps, as in the paper and SimplerEnv's tools/calc_metrics.py.
    """
    real, sim = _rates(real, sim)
    misordered = (sim[:, None] > sim[None, :]) != (real[:, None] > real[None, :])  # (policy i, policy j)
    gaps = np.abs(real[:, None] - real[None, :])
    return float(np.where(misordered, gaps, 0.0).max(axis=1).mean())


def pearson_correlation(real: Sequence[float], sim: Sequence[float]) -> float:
    """SimplerEnv's Pearson correlation of simulated success rates `sim` with real-world ones `real` (one per policy,
    same order; symmetric). As in SimplerEnv: 1 when the two are equal up to a shift (two constant ones included),
    and 1e-8 added to the denominator, so a constant one against a varying one gives 0 and a perfect correlation of
    different scales falls a hair short of 1."""
    real, sim = _rates(real, sim)
    real, sim = real - real.mean(), sim - sim.mean()
    if np.array_equal(real, sim):
        return 1.0
    return float(np.sum(real * sim) / (np.sqrt(np.sum(real ** 2) * np.sum(sim ** 2)) + 1e-8))


def sim_to_real_agreement(sim: Mapping[str, Mapping[str, float]],
                          real: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """MMRV and Pearson per task of simulated success `sim` against real-world success `real`, both
    {policy: {task: rate}}: one row per task with at least 2 policies that have both rates (task, policies: their
    number, mmrv, pearson), then a row "mean": the mean of each metric over those tasks, with the number of distinct
    policies involved. Tasks with fewer policies get no row; no task with 2: an empty table."""
    tasks = dict.fromkeys(task for rates in sim.values() for task in rates)
    rows = []
    for task in tasks:
        policies = [policy for policy in sim if task in sim[policy] and task in real.get(policy, {})]
        if len(policies) < 2:
            continue
        real_rates = [real[policy][task] for policy in policies]
        sim_rates = [sim[policy][task] for policy in policies]
        rows.append({"task": task, "policies": len(policies),
                     "mmrv": mean_maximum_rank_violation(real_rates, sim_rates),
                     "pearson": pearson_correlation(real_rates, sim_rates), "names": policies})
    if not rows:
        return pd.DataFrame(columns=AGREEMENT_COLUMNS)
    table = pd.DataFrame(rows)
    involved = dict.fromkeys(policy for names in table.names for policy in names)
    mean = {"task": MEAN_ROW, "policies": len(involved), "mmrv": table.mmrv.mean(), "pearson": table.pearson.mean()}
    return pd.concat([table[AGREEMENT_COLUMNS], pd.DataFrame([mean])], ignore_index=True)


def by_policy(by_task: Mapping[str, Mapping[str, float]], tasks: Iterable[str]) -> dict[str, dict[str, float]]:
    """{task: {policy: rate}} restricted to `tasks`, turned into {policy: {task: rate}}."""
    rates: dict[str, dict[str, float]] = {}
    for task in tasks:
        for policy, rate in by_task.get(task, {}).items():
            rates.setdefault(policy, {})[task] = rate
    return rates


def read_real_world_success(path: str | Path) -> dict[str, dict[str, float]]:
    """Real-world success rates {policy: {task: rate}} from a file, rates in [0, 1]:
        .yaml/.yml  a mapping policy -> task -> rate
        .csv        a column `configuration` (the policy) and one column per task; a blank cell: not measured
    Every way the file can be wrong is a ReportError naming the file and the bad value."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        try:
            raw = read_yaml_mapping(path, "real-world success rates")
        except ConfigError as error:
            raise ReportError(str(error)) from None
    elif path.suffix == ".csv":
        raw = _read_csv(path)
    else:
        raise ReportError(f"real-world success file {path}: use .yaml, .yml or .csv (a mapping policy -> task -> "
                          "success rate)")
    rates: dict[str, dict[str, float]] = {}
    for policy, by_task in raw.items():
        if not isinstance(by_task, dict):
            raise ReportError(f"{path}: {policy!r} must map task names to success rates; got {by_task!r}")
        rates[str(policy)] = {str(task): _rate(path, policy, task, rate) for task, rate in by_task.items()}
    if not any(rates.values()):
        raise ReportError(f"{path} holds no real-world success rates; give at least one configuration's success on a "
                          f"task (.yaml: configuration -> task -> rate; .csv: a configuration column and a column per "
                          f"task)")
    return rates


def _read_csv(path: Path) -> dict[str, dict[str, float]]:
    if not path.is_file():
        raise ReportError(f"no real-world success file at {path}")
    try:
        frame = pd.read_csv(path, dtype={"configuration": str})
    except pd.errors.EmptyDataError:
        return {}
    except (ValueError, pd.errors.ParserError) as error:
        raise ReportError(f"{path} is not a readable CSV file: {error}") from None
    if "configuration" not in frame:
        raise ReportError(f"{path} needs a column `configuration` (the policy) and one column per task; found "
                          f"{', '.join(frame.columns)}")
    if frame.configuration.duplicated().any():
        raise ReportError(f"{path}: configuration {frame.configuration[frame.configuration.duplicated()].iloc[0]!r} "
                          "has more than one row")
    return {row.configuration: {task: rate for task, rate in row.drop("configuration").items() if not pd.isna(rate)}
            for _, row in frame.iterrows()}


def _rate(path: Path, policy: object, task: object, rate: object) -> float:
    try:
        value = math.nan if isinstance(rate, bool) else float(rate)  # YAML reads yes/no as booleans
    except (TypeError, ValueError):
        value = math.nan
    if not 0 <= value <= 1:
        raise ReportError(f"{path}: the real-world success of {policy!r} on {task!r} must be a rate in [0, 1]; got "
                          f"{rate!r}")
    return value
