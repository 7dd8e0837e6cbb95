"""The report's sections: each a title, notes, tables and plots, assembled from the tables; the plots are
written on the way."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from robovlms.benchmark import BENCHMARKS
from robovlms.errors import ReportError, UnknownNameError
from robovlms.report import plots
from robovlms.report.formatting import (HEADERS, configuration_label, number_text, percent_text, rate_text, readable,
                                        seed_text, shown_configuration, shown_table, wide_table)
from robovlms.report.comparisons import FAMILY_ERROR, MIN_PAIRED_EPISODES
from robovlms.report.main_effects import (baseline_comparison_table, main_effects_table, pairwise_table,
                                         pretraining_effect_table)
from robovlms.report.runs import BASELINE_LABELS, REPEAT_RUN, SweepRuns, complete_cells
from robovlms.report.tables import (CHAIN_LENGTH, breakdown_table, chain_table, chained, configuration_table,
                                    cost_table, data_efficiency_table, failed_cells_table, simulated_task_success,
                                    success_table, versions_table)
from robovlms.results import RESULT_FILE
from robovlms.sim_to_real import PublishedAgreement, read_real_world_success, sim_to_real_agreement


@dataclass
class Table:
    name: str  # the CSV file's stem
    data: pd.DataFrame  # written to CSV
    shown: pd.DataFrame | None  # formatted for reading; None: only written to CSV
    caption: str | None = None  # shown above the table: which episodes its numbers come from


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
    from robovlms.report.pretraining import pretraining_sections

    sections = [_success_section(runs, out), _baselines_section(runs), _search_section(runs),
                _main_effects_section(runs, out), _pretraining_effect_section(runs), *pretraining_sections(runs),
                _breakdown_section(runs, "task"), _sim_to_real_section(runs, real_world),
                _breakdown_section(runs, "scene"), _chain_section(runs), _data_efficiency_section(runs, out),
                _cost_section(runs, out), _training_curves_section(runs, out), _failed_section(runs),
                _configuration_section(runs), _versions_section(runs)]
    return [section for section in sections if section is not None]


def _success_section(runs: SweepRuns, out: Path) -> Section:
    section = Section("Success rate", [
        (f"Benchmark {runs.benchmark}, split {runs.split}, {runs.evaluation_split} episodes. One row per "
         "configuration; baselines (no backbone, nothing learned from images) each have their own row."),
        "successes: successes over all evaluation episodes of the row, seeds pooled; episodes is that number. "
        "[low, high] is the 95% Wilson score interval. seed mean ± std: mean and sample standard deviation of the "
        "per-seed success rates, where a row has several seeds."])
    trained = complete_cells(runs)[lambda cells: cells.kind == "trained"]
    if len(trained) and trained.groupby(runs.configuration, sort=False).seed.nunique().max() > 1:
        section.notes.append("A Wilson interval treats a row's seeds' episodes as one sample: it covers episode "
                             "noise, not how much the configuration varies from seed to seed (seed mean ± std shows "
                             "that); the comparisons below include both.")
    settings = [setting for setting in runs.settings if setting != REPEAT_RUN]
    if settings:
        section.notes.append(f"The cells differ in {', '.join(HEADERS.get(setting, setting) for setting in settings)} "
                             "beyond the backbone, formulation, history, "
                             "chunk and data fraction: each value is a row of its own, never pooled as seeds.")
    if runs.repeats:
        section.notes.append("A seed counts once, but these runs hold the same configuration and seed more than once "
                             "(a copied run, or a sweep run twice): " + "; ".join(runs.repeats) + ". Those rows are "
                             "shown per run (column \"run (repeated seeds)\"), not pooled.")
    success = success_table(runs)
    if success.empty:
        section.notes.append("No cell completed: there is no success to report.")
        return section
    section.tables.append(Table("success", success, shown_table(success, {
        **shown_configuration(runs.configuration), "seeds": "seeds", "episodes": "episodes",
        "successes": lambda row: f"{row.successes}/{row.episodes}", "success [95% CI]": rate_text,
        "seed mean ± std": seed_text}), _evaluated(runs)))
    figure = plots.success_figure([configuration_label(row, runs.settings) for _, row in success.iterrows()],
                                  success.success,
                                  success.wilson_low, success.wilson_high,
                                  [label in BASELINE_LABELS.values() for label in success.backbone_label])
    plots.save_figure(figure, out, "success")
    section.figures.append("success")
    return section


def _evaluated(runs: SweepRuns) -> str:
    """The caption of a table of evaluation numbers: which episodes they come from."""
    purpose = ("numbers for choosing settings, not for reporting" if runs.evaluation_split == "validation" else
               "numbers for reporting, not for choosing settings")
    return f"Evaluated on the {runs.evaluation_split} episodes of {runs.benchmark} {runs.split}: {purpose}."


def _baselines_section(runs: SweepRuns) -> Section | None:
    comparison = baseline_comparison_table(runs)
    if comparison.empty:
        return None
    tests = comparison.attrs["tests"]
    section = Section("Against the baselines", [
        ("Each trained configuration against each baseline: the mean difference in success (configuration - "
         "baseline) over the configuration's seeds, each seed's cell compared with the baseline episode by episode "
         "on the episodes both ran, with its own 95% interval. Pairing on episodes resolves differences that two "
         "overlapping Wilson intervals leave open."),
        _family_note(tests, "configuration and baseline"),
        _pair_noise_note(comparison.attrs, runs, seeds_only=True),
        ("The last two columns: whether the configuration is resolved above every baseline, and whether its "
         "Wilson interval (seeds pooled) lies wholly above every baseline's, a stricter test that is not adjusted "
         "for the family.")])
    shown = comparison.assign(
        configuration=[configuration_label(row, runs.settings) for _, row in comparison.iterrows()],
        text=[f"{_difference_text(row)}; {_verdict_text(row)}" for _, row in comparison.iterrows()])
    wide = shown.pivot(index="configuration", columns="baseline", values="text")
    wide = wide.loc[shown.configuration.unique(), shown.baseline.unique()]
    wide.columns = [f"- {label}" for label in wide.columns]
    verdicts = shown.assign(above=shown.resolved & (shown.difference > 0)).groupby("configuration", sort=False).agg(
        above=("above", "all"), apart=("interval_above", "all"))
    wide["beats every baseline (Holm)"] = verdicts.above.map({True: "yes", False: "no"})
    wide["Wilson interval above every baseline's"] = verdicts.apart.map({True: "yes", False: "no"})
    section.tables.append(Table("baseline_comparison", comparison, wide.reset_index(), _evaluated(runs)))
    return section


def _family_note(tests: int, compared: str) -> str:
    if not tests:
        return (f"No comparison of this table has {MIN_PAIRED_EPISODES} episodes per pair of cells, too few for "
                "the interval's approximation: none is tested, and none is resolved.")
    return (f"Resolved (Holm): the comparison's p-value, Holm-adjusted over the {tests} "
            f"comparison{'' if tests == 1 else 's'} of this table (one per {compared}), is below "
            f"{FAMILY_ERROR:.2f}, so the chance that any difference this table calls resolved does not exist stays "
            f"within {FAMILY_ERROR:.0%}. The interval beside it is the comparison's own, not adjusted: one that "
            "excludes 0 without \"resolved\" is not evidence once the table's other comparisons are counted. A "
            f"comparison of fewer than {MIN_PAIRED_EPISODES} episodes per pair of cells is never resolved and is no "
            "test of the family: on fewer, the interval's approximation fails (a difference on 2 episodes can have "
            "no spread at all).")


def _pair_noise_note(attributes: dict, runs: SweepRuns, seeds_only: bool) -> str:
    """What the intervals cover beyond episode noise, from the family's pooled pair noise."""
    trained = complete_cells(runs)[lambda cells: cells.kind == "trained"]
    seeds = int(trained.groupby(runs.configuration, sort=False).seed.nunique().max()) if len(trained) else 0
    if not attributes["pair_noise_df"]:
        return ("One seed per configuration: the intervals cover episode noise only (which episodes were drawn), "
                "not how much a configuration varies from one training seed to another. They say whether these "
                "trained cells differ on the evaluation episodes' distribution; train two or more seeds to compare "
                "configurations.")
    who = "the seeds of a configuration" if seeds_only else "matched pairs"
    over = ("" if seeds_only else " over seeds and the other axes' levels" if seeds > 1 else
            " over the other axes' levels (one seed per configuration, so this also holds those axes' interactions "
            "with the compared one)")
    df = attributes["pair_noise_df"]
    freedom = f"{df:.0f} effective degree{'' if round(df) == 1 else 's'} of freedom"
    size = (f"{attributes['pair_noise_sd'] * 100:.1f} points per pair" if attributes["pair_noise_sd"] >= 0.0005 else
            "no more than episode noise explains")
    return (f"The intervals include how much a pair's difference varies beyond episode noise, estimated from how "
            f"{who} disagree{over}, pooled over this table's comparisons: {size} ({freedom}).")


def _verdict_text(row: pd.Series) -> str:
    if pd.isna(row.p_holm):
        return f"fewer than {MIN_PAIRED_EPISODES} episodes: not tested"
    return f"{'resolved' if row.resolved else 'not resolved'} (Holm p {row.p_holm:.2g})"


def _search_section(runs: SweepRuns) -> Section | None:
    """A search's trials (`robovlms tune`): one row each with its parameters, state and objective value, and its
    best trial."""
    if not runs.trials:
        return None
    section = Section("Search trials", ["One row per trial of the search: its sampled parameters, its state "
                                        "(COMPLETE; PRUNED: stopped early by the median pruner on val/loss, or the "
                                        "parameters of an earlier trial, see \"duplicate of\") and the objective "
                                        "value. Each complete trial is also a row of the success table."])
    for run, trials in runs.trials.items():
        name = f"trials_{run}" if len(runs.trials) > 1 else "trials"
        shown = {"trial": "number", "state": "state", "value": "value",
                 **{column.removeprefix("params_"): column for column in trials if column.startswith("params_")},
                 **{column.removeprefix("user_attrs_"): column for column in ("user_attrs_cell", "user_attrs_error")
                    if column in trials}}
        if "user_attrs_duplicate_of" in trials:
            shown["duplicate of"] = lambda row: "" if pd.isna(row.user_attrs_duplicate_of) else \
                str(int(row.user_attrs_duplicate_of))
        best = runs.best.get(run)
        if best is not None:
            objective = best.get("objective", "value")
            if objective == "success":
                objective += f" on the {best.get('evaluation_split', runs.evaluation_split)} episodes"
            section.notes.append(f"{run}: objective {objective} ({best['direction']}); best "
                                 f"trial {best['trial']}, value {best['value']:.4g}, parameters "
                                 f"{json.dumps(best['params'], sort_keys=True)}, cell {best['cell']}.")
        section.tables.append(Table(name, trials, shown_table(trials, shown), _evaluated(runs)))
    return section


def _breakdown_section(runs: SweepRuns, by: str) -> Section | None:
    table = breakdown_table(runs, by)
    if table.empty:
        return None
    shown = wide_table(table, by, lambda row: f"{percent_text(row.success)} ({row.successes}/{row.episodes})",
                       runs.configuration)
    attempts = "subtask attempts (chains that reached it)" if by == "task" and chained(runs.episodes) else "episodes"
    return Section(f"Success per {by}", [f"Each cell: success rate (successes/{attempts} of that {by}, seeds "
                                         "pooled)."], [Table(f"per_{by}", table, shown, _evaluated(runs))])


def _real_world_success(path: Path, runs: SweepRuns, sim: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The real-world rates of a file, keyed by configuration label (a baseline may be named by its policy name),
    every label and task checked against the run's."""
    real = read_real_world_success(path)
    baselines = complete_cells(runs)[lambda cells: cells.kind == "baseline"]
    labels = {**{label: label for label in sim}, **{row.policy: configuration_label(row, runs.settings)
                                                    for _, row in baselines.iterrows()
                                                    if configuration_label(row, runs.settings) in sim}}
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
    return shown_table(table, {"task": "task", "policies": "policies",
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
            section.tables.append(Table("sim_to_real_agreement", agreement, _agreement_shown(agreement),
                                        _evaluated(runs)))
            section.tables.append(Table("sim_to_real_pairs", pairs, shown_table(pairs, {
                "configuration": "configuration", "task": "task",
                "simulated": lambda row: percent_text(row.sim_success),
                "real world": lambda row: percent_text(row.real_success)}), _evaluated(runs)))
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
    in_a_row = {str(k): (lambda row, k=k: percent_text(row[str(k)])) for k in range(1, CHAIN_LENGTH + 1)}
    shown = shown_table(chain, {**shown_configuration(runs.configuration), "episodes": "episodes", **in_a_row,
                           "average length": lambda row: f"{row.average_length:.2f}"})
    return Section("Tasks completed in a row", [
        f"Columns 1 to {CHAIN_LENGTH}: share of episodes that completed at least that many of the chain's subtasks "
        "in a row; average length: the mean number completed."], [Table("chain", chain, shown, _evaluated(runs))])


def _data_efficiency_section(runs: SweepRuns, out: Path) -> Section | None:
    efficiency = data_efficiency_table(runs)
    if efficiency.empty:
        return None
    shown = wide_table(efficiency.assign(data_fraction=[f"data {value:g}" for value in efficiency.data_fraction]),
                       "data_fraction", rate_text, runs.configuration)
    series = {configuration_label(group.iloc[0].drop("data_fraction"), runs.settings):
              (group.data_fraction, group.success, group.wilson_low, group.wilson_high)
              for _, group in efficiency.groupby([column for column in runs.configuration
                                                  if column != "data_fraction"], sort=False)}
    plots.save_figure(plots.data_efficiency_figure(series), out, "data_efficiency")
    return Section("Data efficiency", [
        "Success (95% Wilson interval) against the fraction of training demonstrations used, seeds pooled."],
        [Table("data_efficiency", efficiency, shown, _evaluated(runs))], ["data_efficiency"])


def _cost_section(runs: SweepRuns, out: Path) -> Section | None:
    cost = cost_table(runs)
    if cost.empty:
        return None
    section = Section("Cost", ["The backbone's size, parameters of the whole policy, mean training time, and the "
                               "median time of one policy step (observation in, action out), averaged over seeds, "
                               "timed where the policy ran: on its device, with as many episodes at once as the "
                               "evaluation's policy server stepped together."])
    section.tables.append(Table("cost", cost, shown_table(cost, {
        **shown_configuration(runs.configuration), "backbone size": "backbone_size",
        "parameters": lambda row: number_text(row.parameters),
        "trainable": lambda row: number_text(row.trainable_parameters),
        "training (s)": lambda row: number_text(row.train_seconds),
        "step (ms)": lambda row: _policy_cost(row, number_text(row.step_latency_ms, 1)),
        "steps/s (Hz)": lambda row: _policy_cost(row, number_text(row.steps_per_second, 1)),
        "step timed on": lambda row: _policy_cost(row, row.step_timed_on),
        "success [95% CI]": rate_text}), _evaluated(runs)))
    timed = cost[(cost.step_latency_ms > 0) & ~cost.backbone_label.isin(BASELINE_LABELS.values())]
    if len(timed):
        figure = plots.latency_figure([configuration_label(row, runs.settings) for _, row in timed.iterrows()],
                                      timed.step_latency_ms, timed.success, timed.wilson_low, timed.wilson_high)
        plots.save_figure(figure, out, "success_vs_latency")
        section.figures.append("success_vs_latency")
    return section


def _policy_cost(row: pd.Series, text: str) -> str:
    """A baseline's step costs microseconds of table lookups, not a model's inference: shown as "-"."""
    return "-" if row.backbone_label in BASELINE_LABELS.values() else text


def _training_curves_section(runs: SweepRuns, out: Path) -> Section | None:
    if "train/loss" not in runs.curves:
        return None
    cells = runs.cells.set_index(["run", "cell_id"])
    several_runs = runs.cells.run.nunique() > 1
    panels: dict[str, dict] = {}  # one per formulation: their losses differ in kind and scale
    for (run, cell_id), curve in runs.curves.dropna(subset=["train/loss"]).groupby(["run", "cell_id"], sort=False):
        cell = cells.loc[(run, cell_id)]
        label = f"{configuration_label(cell, runs.settings)} · seed {cell.seed}" + (f" · {run}" if several_runs else "")
        curves = panels.setdefault(cell.formulation or "(unknown formulation)", {})
        curves[label + (" (failed)" if cell.status != "complete" else "")] = (curve.step, curve["train/loss"])
    plots.save_figure(plots.training_curves_figure(dict(map(_common_parts_in_title, panels.items()))), out,
                      "training_curves")
    return Section("Training curves", ["train/loss against optimiser step, one line per trained cell and one panel "
                                       "per formulation, whose losses differ in kind (cross-entropy over action "
                                       "bins, regression) and scale (from Lightning's CSV log); every logged metric "
                                       "is in training_curves.csv."],
                   [Table("training_curves", runs.curves, None)], ["training_curves"])


def _common_parts_in_title(panel: tuple[str, dict]) -> tuple[str, dict]:
    """A panel's title and curves, the parts (" · ") every curve's label shares moved from the labels to the title,
    so that a legend names only what tells its lines apart."""
    title, curves = panel
    parts = [label.split(" · ") for label in curves]
    common = set.intersection(*map(set, parts)) if len(parts) > 1 else set()
    return (" · ".join([title, *(part for part in parts[0] if part in common and part != title)]),
            {" · ".join(part for part in label if part not in common): curve
             for label, curve in zip(parts, curves.values())})


def _failed_section(runs: SweepRuns) -> Section:
    failed = failed_cells_table(runs)
    if failed.empty and runs.damaged.empty:
        return Section("Failed cells", ["Every cell completed."])
    notes = [f"{len(failed)} cell(s) did not complete."] if len(failed) else []
    if len(runs.damaged):
        notes.append(f"{len(runs.damaged)} cell(s) have files that cannot be read (status damaged: its "
                     f"{RESULT_FILE}, so the cell is in no other table; records unreadable: in the success table, "
                     f"not in the per-task and per-scene tables).")
    failed = pd.concat([failed, runs.damaged[failed.columns]], ignore_index=True)
    return Section("Failed cells", notes, [Table("failed_cells", failed, readable(failed.rename(columns=HEADERS)))])


def _configuration_section(runs: SweepRuns) -> Section:
    cells = configuration_table(runs)
    return Section("Configuration of every cell", [
        "Each cell's axes below; its full resolved config in the collapsed blocks and in cells.json."],
        [Table("cells", cells, readable(cells.rename(columns=HEADERS)))],
        details=[(result.cell_id, json.dumps({"axes": result.axes, "config": result.config}, indent=2,
                                             sort_keys=True, default=str)) for result in runs.results])


def _versions_section(runs: SweepRuns) -> Section:
    versions = versions_table(runs)
    differ = versions.versions.str.contains(",").any()
    return Section("Software versions", ["Several versions in one row mean the cells ran on different software."
                                         if differ else "All cells ran on the same software."],
                   [Table("versions", versions, versions)])


def _main_effects_section(runs: SweepRuns, out: Path) -> Section | None:
    effects = main_effects_table(runs)
    if effects.empty:
        return None
    pairs = pairwise_table(runs)
    section = Section("Main effects", [
        ("For each design axis that varies among the trained cells: success of each level, pooled over everything "
         "else that varies (with its 95% Wilson interval), then each pair of levels compared on matched cells only "
         "(cells that agree on every other axis and the seed, except axes that the compared one sets, such as the "
         "history each formulation was run with, named in the last column): the mean difference in success over "
         "the matched pairs, each pair compared episode by episode, with its own 95% interval. A pair of levels "
         "with no matched cells cannot be compared, because what else differs would be compared too."),
        _family_note(pairs.attrs["tests"], "pair of levels"),
        _pair_noise_note(pairs.attrs, runs, seeds_only=False)])
    section.tables.append(Table("main_effects", effects, shown_table(effects, {
        "axis": "axis", "level": "level", "cells": "cells", "episodes": "episodes",
        "success [95% CI]": rate_text}), _evaluated(runs)))
    section.tables.append(Table("main_effect_differences", pairs, shown_table(pairs, {
        "axis": "axis", "a": "level_a", "b": "level_b", "matched cells": "matched_cells",
        "episodes per pair": "episodes", "a - b [95% CI]": _difference_text,
        "resolved (Holm)": lambda row: "" if pd.isna(row.difference) else _verdict_text(row),
        "levels also differ in": "also_differs"}), _evaluated(runs)))
    series = {axis: (group.level.tolist(), group.success, group.wilson_low, group.wilson_high)
              for axis, group in effects.groupby("axis", sort=False)}
    plots.save_figure(plots.main_effects_figure(series), out, "main_effects")
    section.figures.append("main_effects")
    return section


def _pretraining_effect_section(runs: SweepRuns) -> Section | None:
    effects = pretraining_effect_table(runs)
    if effects.empty:
        return None
    return Section("The pre-training effect per architecture", [
        ("Each architecture pre-trained against the same architecture from a random init, on matched cells only "
         "(the same formulation, every other varying axis and the seed): the mean difference in success over the "
         "matched pairs, each pair compared episode by episode, with its own 95% interval. The main effects above "
         "pool the architectures; this table tells them apart."),
        _family_note(effects.attrs["tests"], "architecture"),
        _pair_noise_note(effects.attrs, runs, seeds_only=False)],
        [Table("pretraining_effect", effects, shown_table(effects, {
            "backbone": "backbone", "pre-training": "pretraining", "matched cells": "matched_cells",
            "episodes per pair": "episodes", "pre-trained - random init [95% CI]": _difference_text,
            "resolved (Holm)": lambda row: "" if pd.isna(row.difference) else _verdict_text(row)}),
            _evaluated(runs))])


def _difference_text(row: pd.Series) -> str:
    if pd.isna(row.difference):
        return "no matched cells"
    if pd.isna(row.low):  # a pair of one episode has no spread to make an interval of
        return f"{row.difference * 100:+.0f} points, no interval"
    return f"{row.difference * 100:+.0f} [{row.low * 100:+.0f}, {row.high * 100:+.0f}] points"

