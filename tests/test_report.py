import dataclasses
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from robovlms.benchmark import EpisodeRecord
from robovlms.cli import app
from robovlms.errors import ReportError
from robovlms.report import wilson_interval, write_report
from robovlms.results import CellResult, read_cell_result, write_cell_result, write_records

CHROMIUM = Path("/usr/bin/chromium")
TASKS = ("door-open", "button-press-topdown")
SCENES = ("C", "D")
CHAIN = ("open_drawer", "turn_on_led", "move_slider_left", "lift_red_block_table", "place_in_slider")
SCRATCH = "gpt-scratch (tiny, random init)"
PRETRAINED = "kosmos2 (pretrained: microsoft/kosmos-2)"
VERSIONS = {"python": "3.11.9", "robovlms": "0.1.0", "torch": "2.13.0"}


def episode_records(rng, success_rate, chain=False):
    """Three episodes per task and scene; chain benchmarks also count subtasks completed in a row."""
    records = []
    for task in TASKS:
        for scene in SCENES:
            for seed in range(3):
                completed = int(rng.integers(0, 6)) if chain else None
                success = completed == 5 if chain else bool(rng.random() < success_rate)
                extra = {"subtasks": list(CHAIN), "subtask_success": [True] * completed + [False] * (completed < 5)
                         } if chain else {}
                records.append(EpisodeRecord(task=task, scene=scene, instruction=f"do {task}", seed=seed,
                                             success=success, steps=50, seconds=0.1, subtasks_completed=completed,
                                             extra=extra))
    return records


def add_cell(run_dir, cell_id, records=None, benchmark="metaworld", split="AB->CD", **fields):
    """Commit one cell as a sweep worker would; returns its records."""
    cell_dir = run_dir / "cells" / cell_id
    cell_dir.mkdir(parents=True)
    if records is not None:
        write_records(cell_dir, records)
        successes = sum(record.success for record in records)
        fields.update(episodes=len(records), successes=successes, success=successes / len(records),
                      scores={"success": successes / len(records)})
    write_cell_result(cell_dir, CellResult(cell_id=cell_id, benchmark=benchmark, split=split, versions=VERSIONS,
                                           **fields))
    return records


def add_trained_cell(run_dir, rng, cell_id, backbone, label, formulation, data_fraction=1.0, seed=0, latency=20.0,
                     chain=False, settings=None, **fields):
    config = {"backbone": backbone, "formulation": formulation, "history": 2, "chunk": 4,
              "data_fraction": data_fraction, "seed": seed, "lr": 1e-4, **(settings or {})}
    records = add_cell(run_dir, cell_id, episode_records(rng, rng.uniform(0.2, 0.9), chain), status="complete",
                       kind="trained", policy="trained", backbone=backbone, backbone_label=label,
                       random_init="random init" in label, formulation=formulation, history=2, chunk=4,
                       data_fraction=data_fraction, seed=seed, parameters=1_000_000, trainable_parameters=400_000,
                       train_seconds=60.0, step_latency_ms=latency, final_train_loss=0.5, config=config,
                       axes={"backbone": backbone, "formulation": formulation, "data_fraction": data_fraction,
                             "seed": seed}, **fields)
    logs = run_dir / "cells" / cell_id / "train" / "logs" / "version_0"
    logs.mkdir(parents=True)
    pd.DataFrame({"step": [0, 10, 20], "train/loss": [2.0, 1.0, 0.5], "train/arm_error": [0.9, 0.5, 0.3],
                  "train/gripper_accuracy": [0.5, 0.7, 0.9]}).to_csv(logs / "metrics.csv", index=False)
    return records


def make_sweep(run_dir):
    """2 backbones x 2 formulations, a second seed and a second data fraction of one configuration, three baselines
    and one failed cell; returns {cell_id: records}."""
    rng = np.random.default_rng(0)
    records = {}
    for backbone, label in (("gpt-scratch", SCRATCH), ("kosmos2", PRETRAINED)):
        for formulation in ("policy-head", "one-step-continuous"):
            cell_id = f"{backbone}-{formulation}"
            records[cell_id] = add_trained_cell(run_dir, rng, cell_id, backbone, label, formulation,
                                                latency=5.0 if backbone == "gpt-scratch" else 40.0)
    records["gpt-scratch-policy-head-seed1"] = add_trained_cell(run_dir, rng, "gpt-scratch-policy-head-seed1",
                                                                "gpt-scratch", SCRATCH, "policy-head", seed=1)
    records["gpt-scratch-policy-head-half"] = add_trained_cell(run_dir, rng, "gpt-scratch-policy-head-half",
                                                               "gpt-scratch", SCRATCH, "policy-head", 0.5)
    for policy, rate in (("zero", 0.0), ("mean", 0.2), ("replay", 0.3)):
        records[f"baseline-{policy}"] = add_cell(run_dir, f"baseline-{policy}", episode_records(rng, rate),
                                                 status="complete", kind="baseline", policy=policy,
                                                 step_latency_ms=0.1, config={"policy": policy})
    add_cell(run_dir, "kosmos2-interleaved", status="failed", kind="trained", policy="trained",
             axes={"backbone": "kosmos2", "formulation": "interleaved"},
             error="TrainingDivergedError: train/loss is NaN at step 12")  # as the sweep records a failure
    (run_dir / "cells" / "gpt-scratch-interleaved").mkdir()  # a cell whose worker never committed
    return records


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "sweep"
    records = make_sweep(run_dir)
    out = run_dir.parent / "report"
    write_report([run_dir], out)
    return out, records


def pooled(records_lists):
    records = [record for records in records_lists for record in records]
    return sum(record.success for record in records), len(records)


def row_of(table, **values):
    rows = table
    for column, value in values.items():
        rows = rows[rows[column] == value]
    assert len(rows) == 1, values
    return rows.iloc[0]


def test_wilson_interval_matches_the_known_value():
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)


def test_wilson_interval_of_no_episodes_is_nan_and_of_all_or_none_stays_in_the_unit_interval():
    assert all(math.isnan(bound) for bound in wilson_interval(0, 0))
    assert wilson_interval(0, 10)[0] == pytest.approx(0) and wilson_interval(10, 10)[1] == pytest.approx(1)


def test_success_table_pools_seeds_with_wilson_intervals(sweep):
    out, records = sweep
    table = pd.read_csv(out / "success.csv")
    row = row_of(table, backbone_label=SCRATCH, formulation="policy-head", data_fraction=1.0)
    successes, episodes = pooled([records["gpt-scratch-policy-head"], records["gpt-scratch-policy-head-seed1"]])
    assert (row.seeds, row.episodes, row.successes) == (2, episodes, successes)
    assert row.success == pytest.approx(successes / episodes)
    assert (row.wilson_low, row.wilson_high) == pytest.approx(wilson_interval(successes, episodes))
    per_seed = [pooled([records[cell]])[0] / 12
                for cell in ("gpt-scratch-policy-head", "gpt-scratch-policy-head-seed1")]
    assert row.seed_mean == pytest.approx(np.mean(per_seed))
    assert row.seed_std == pytest.approx(np.std(per_seed, ddof=1))
    single = row_of(table, backbone_label=PRETRAINED, formulation="one-step-continuous")
    assert single.seeds == 1 and math.isnan(single.seed_std)
    assert single.success == pytest.approx(pooled([records["kosmos2-one-step-continuous"]])[0] / 12)


def test_success_table_has_a_row_per_backbone_formulation_and_one_per_baseline(sweep):
    table = pd.read_csv(sweep[0] / "success.csv")
    assert len(table) == 2 * 2 + 1 + 3  # configurations, the half-data configuration, baselines
    baselines = table.backbone_label.tolist()[-3:]
    assert baselines == ["zero action (baseline)", "mean action (baseline)", "demo replay (baseline)"]
    assert row_of(table, backbone_label="zero action (baseline)").success == 0


@pytest.mark.parametrize("by, values", [("task", TASKS), ("scene", SCENES)])
def test_per_task_and_per_scene_tables_match_the_records(sweep, by, values):
    out, records = sweep
    table = pd.read_csv(out / f"per_{by}.csv")
    for value in values:
        row = row_of(table, backbone_label=PRETRAINED, formulation="policy-head", **{by: value})
        selected = [r for r in records["kosmos2-policy-head"] if getattr(r, by) == value]
        assert (row.successes, row.episodes) == (sum(r.success for r in selected), len(selected))
        assert (row.wilson_low, row.wilson_high) == pytest.approx(wilson_interval(row.successes, row.episodes))
    assert f"Success per {by}" in (out / "index.md").read_text()


def test_report_names_the_split(sweep):
    assert "split AB->CD" in (sweep[0] / "index.md").read_text()


def test_data_efficiency_table_and_plot_when_several_fractions(sweep):
    out, records = sweep
    table = pd.read_csv(out / "data_efficiency.csv")
    half = row_of(table, backbone_label=SCRATCH, formulation="policy-head", data_fraction=0.5)
    assert (half.successes, half.episodes) == pooled([records["gpt-scratch-policy-head-half"]])
    assert row_of(table, backbone_label=SCRATCH, formulation="policy-head", data_fraction=1.0).seeds == 2
    assert (out / "data_efficiency.png").is_file() and (out / "data_efficiency.svg").is_file()


def test_cost_table_gives_latency_in_ms_and_hz_and_plots_success_against_it(sweep):
    out, _ = sweep
    table = pd.read_csv(out / "cost.csv")
    row = row_of(table, backbone_label=PRETRAINED, formulation="policy-head")
    assert (row.parameters, row.train_seconds, row.step_latency_ms) == (1_000_000, 60.0, 40.0)
    assert row.steps_per_second == pytest.approx(25.0)
    assert (out / "success_vs_latency.png").is_file() and (out / "success_vs_latency.svg").is_file()


def test_the_cost_table_says_on_which_device_and_with_how_many_episodes_a_step_was_timed(tmp_path):
    rng = np.random.default_rng(0)
    add_trained_cell(tmp_path / "run", rng, "served", "gpt-scratch", SCRATCH, "policy-head",
                     latency_device="cuda:0 (NVIDIA H200)", latency_batch=8)
    add_trained_cell(tmp_path / "run", rng, "alone", "kosmos2", PRETRAINED, "policy-head", latency_device="cpu",
                     latency_batch=1)
    write_report([tmp_path / "run"], tmp_path / "report")
    table = pd.read_csv(tmp_path / "report" / "cost.csv")
    assert row_of(table, backbone_label=SCRATCH).step_timed_on == "cuda:0 (NVIDIA H200), 8 at once"
    assert row_of(table, backbone_label=PRETRAINED).step_timed_on == "cpu, 1 episode"
    assert "step timed on" in (tmp_path / "report" / "index.md").read_text()


def test_training_curves_of_every_trained_cell_are_written_and_plotted(sweep):
    out, _ = sweep
    curves = pd.read_csv(out / "training_curves.csv")
    assert curves.cell_id.nunique() == 6
    assert curves[curves.cell_id == "kosmos2-policy-head"]["train/loss"].tolist() == [2.0, 1.0, 0.5]
    assert (out / "training_curves.png").is_file() and (out / "training_curves.svg").is_file()


@pytest.mark.parametrize("table", ["success", "per_task", "per_scene", "data_efficiency", "cost"])
def test_every_table_labels_random_init_backbones(sweep, table):
    frame = pd.read_csv(sweep[0] / f"{table}.csv")
    assert set(frame.backbone_label[frame.backbone_label.str.startswith("gpt-scratch")]) == {SCRATCH}


def test_markdown_tables_label_random_init_rows(sweep):
    table_rows = [line for line in (sweep[0] / "index.md").read_text().splitlines() if line.startswith("|")]
    scratch_rows = [line for line in table_rows if re.search(r"\| gpt-scratch(?!-)", line)]  # not cell ids
    assert scratch_rows and all("(tiny, random init)" in line for line in scratch_rows)


def test_report_states_episodes_per_row_and_that_intervals_are_wilson(sweep):
    text = (sweep[0] / "index.md").read_text()
    assert "95% Wilson score interval" in text
    assert re.search(r"\| +episodes +\|", text)


def test_failed_and_unfinished_cells_are_listed_with_why(sweep):
    failed = pd.read_csv(sweep[0] / "failed_cells.csv")
    diverged = row_of(failed, cell_id="kosmos2-interleaved")
    assert diverged.error == "TrainingDivergedError: train/loss is NaN at step 12"
    assert diverged["axes"] == '{"backbone": "kosmos2", "formulation": "interleaved"}'
    assert row_of(failed, cell_id="gpt-scratch-interleaved").status == "unfinished"
    assert "train/loss is NaN at step 12" in (sweep[0] / "index.md").read_text()


def test_every_cells_configuration_and_the_software_versions_are_listed(sweep):
    out, _ = sweep
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 4 + 2 + 3 + 1
    text = (out / "index.md").read_text()
    assert '"lr": 0.0001' in text
    versions = pd.read_csv(out / "versions.csv")
    assert row_of(versions, package="torch").versions == "2.13.0"


def test_a_run_without_results_still_gives_a_report_listing_its_unfinished_cells(tmp_path):
    run_dir = tmp_path / "empty"
    (run_dir / "cells" / "gpt-scratch-policy-head").mkdir(parents=True)
    index = write_report([run_dir], tmp_path / "report")
    assert "No cell of these runs has committed" in index.with_suffix(".md").read_text()
    unfinished = pd.read_csv(tmp_path / "report" / "failed_cells.csv")
    assert unfinished[["cell_id", "status"]].values.tolist() == [["gpt-scratch-policy-head", "unfinished"]]


def test_a_run_of_only_failed_cells_reports_them(tmp_path):
    add_cell(tmp_path / "run", "broken", status="failed", kind="baseline", policy="replay", error="store missing")
    out = tmp_path / "report"
    write_report([tmp_path / "run"], out)
    assert pd.read_csv(out / "failed_cells.csv").error.tolist() == ["store missing"]


def test_chain_benchmarks_get_tasks_in_a_row_and_average_length(tmp_path):
    rng = np.random.default_rng(1)
    records = add_trained_cell(tmp_path / "calvin", rng, "chain", "gpt-scratch", SCRATCH, "policy-head", chain=True)
    out = tmp_path / "report"
    write_report([tmp_path / "calvin"], out)
    row = pd.read_csv(out / "chain.csv").iloc[0]
    completed = np.array([record.subtasks_completed for record in records])
    for k in range(1, 6):
        assert row[str(k)] == pytest.approx((completed >= k).mean())
    assert row.average_length == pytest.approx(completed.mean())
    assert row.backbone_label == SCRATCH
    per_subtask = pd.read_csv(out / "per_task.csv").set_index("task")
    assert list(per_subtask.index) == list(CHAIN)  # subtasks, over the chains that reached each
    assert per_subtask.loc["open_drawer", "episodes"] == len(records)
    assert per_subtask.loc["turn_on_led", "episodes"] == (completed >= 1).sum()
    assert per_subtask.loc["turn_on_led", "successes"] == (completed >= 2).sum()


def test_single_task_benchmarks_get_no_chain_table(sweep):
    assert not (sweep[0] / "chain.csv").exists()


def test_runs_of_one_benchmark_and_split_are_reported_together_seeds_pooled(tmp_path):
    rng = np.random.default_rng(2)
    first = add_trained_cell(tmp_path / "a", rng, "cell", "gpt-scratch", SCRATCH, "policy-head", seed=0)
    second = add_trained_cell(tmp_path / "b", rng, "cell", "gpt-scratch", SCRATCH, "policy-head", seed=1)
    write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report")
    row = pd.read_csv(tmp_path / "report" / "success.csv").iloc[0]
    assert (row.seeds, row.successes, row.episodes) == (2, *pooled([first, second]))
    assert pd.read_csv(tmp_path / "report" / "cells.csv").run.tolist() == ["a", "b"]


def test_a_copied_run_counts_each_seed_once_and_names_the_repeated_cells(tmp_path):
    records = add_trained_cell(tmp_path / "demo", np.random.default_rng(3), "cell", "gpt-scratch", SCRATCH,
                               "policy-head")
    shutil.copytree(tmp_path / "demo", tmp_path / "demo_copy")
    write_report([tmp_path / "demo", tmp_path / "demo_copy"], tmp_path / "report")
    table = pd.read_csv(tmp_path / "report" / "success.csv")
    successes, episodes = pooled([records])
    assert table.repeat_run.tolist() == ["demo", "demo_copy"]
    assert table.seeds.tolist() == [1, 1] and table.episodes.tolist() == [episodes, episodes]
    assert (table.wilson_low[0], table.wilson_high[0]) == pytest.approx(wilson_interval(successes, episodes))
    assert "is in demo (cell cell), demo_copy (cell cell)" in (tmp_path / "report" / "index.md").read_text()


def test_a_repeated_configuration_and_seed_within_one_run_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    for cell in ("first", "second"):
        add_trained_cell(tmp_path / "run", rng, cell, "gpt-scratch", SCRATCH, "policy-head")
    with pytest.raises(ReportError, match=r"cells run \(cell first\), run \(cell second\) repeat .* seed 0"):
        write_report([tmp_path / "run"], tmp_path / "report")


def test_cells_that_differ_in_another_training_setting_are_separate_rows_not_seeds(tmp_path):
    rng = np.random.default_rng(5)
    for rate in (1e-3, 1e-4):
        add_trained_cell(tmp_path / "run", rng, f"lr{rate}", "gpt-scratch", SCRATCH, "policy-head",
                         settings={"learning_rate": rate, "formulation_options": {"head": "lstm"}})
    write_report([tmp_path / "run"], tmp_path / "report")
    table = pd.read_csv(tmp_path / "report" / "success.csv")
    assert sorted(table.learning_rate) == [0.0001, 0.001] and table.seeds.tolist() == [1, 1]
    assert "formulation_options.head" not in table  # the same in every cell
    assert "differ in learning_rate" in (tmp_path / "report" / "index.md").read_text()


def write_sweep_settings(run_dir, tasks=("door-open",), episodes_per_task=10, store="data/demo"):
    (run_dir / "sweep.yaml").write_text(yaml.safe_dump({
        "benchmark": {"name": "metaworld", "split": "AB->CD", "options": {"tasks": list(tasks)}},
        "evaluation": {"episodes_per_task": episodes_per_task, "workers": 1}, "store": {"path": store}}))


@pytest.mark.parametrize("setting, values, message", [
    ("tasks", (["door-open"], ["door-open", "button-press-topdown"]),
     r'different benchmark option \'tasks\': \["door-open"\] in a; \["door-open", "button-press-topdown"\] in b'),
    ("episodes_per_task", (10, 50), "different episodes per task: 10 in a; 50 in b"),
    ("store", ("data/demo", "data/other"), 'different store: "data/demo" in a; "data/other" in b')])
def test_runs_evaluated_differently_are_refused_naming_the_setting_values_and_runs(tmp_path, setting, values,
                                                                                  message):
    for run, value in zip("ab", values):
        add_cell(tmp_path / run, "zero", status="complete", kind="baseline", policy="zero")
        write_sweep_settings(tmp_path / run, **{setting: value})
    with pytest.raises(ReportError, match=message):
        write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report")


@pytest.fixture(scope="module")
def search_report(tmp_path_factory):
    """A learning-rate search as `robovlms tune` leaves it: three complete trials and a pruned one."""
    run_dir = tmp_path_factory.mktemp("search") / "run"
    rng = np.random.default_rng(6)
    rates = [1e-3, 1e-4, 1e-5]
    for trial, rate in enumerate(rates):
        add_trained_cell(run_dir, rng, f"search-{trial:04d}", "gpt-scratch", SCRATCH, "policy-head", trial=trial,
                         settings={"learning_rate": rate})
    (run_dir / "cells" / "search-0003").mkdir()
    (run_dir / "results").mkdir()
    pd.DataFrame({"number": [0, 1, 2, 3], "state": ["COMPLETE"] * 3 + ["PRUNED"], "value": [0.5, 0.75, 0.25, None],
                  "params_learning_rate": [*rates, 0.01],
                  "user_attrs_cell": [f"search-{trial:04d}" for trial in range(4)]}
                 ).to_csv(run_dir / "results" / "trials.csv", index=False)
    (run_dir / "results" / "best.json").write_text(json.dumps({
        "trial": 1, "value": 0.75, "params": {"learning_rate": 1e-4}, "cell": "search-0001", "objective": "success",
        "direction": "maximize"}))
    write_report([run_dir], run_dir.parent / "report")
    return run_dir.parent / "report"


def test_a_search_report_has_a_success_row_per_trial_with_its_parameters(search_report):
    table = pd.read_csv(search_report / "success.csv")
    assert table.learning_rate.tolist() == [0.001, 0.0001, 1e-05] and table.seeds.tolist() == [1, 1, 1]


def test_a_search_report_lists_every_trial_and_names_the_best(search_report):
    trials = pd.read_csv(search_report / "trials.csv")
    assert trials.state.tolist() == ["COMPLETE"] * 3 + ["PRUNED"]
    text = (search_report / "index.md").read_text()
    assert "## Search trials" in text
    assert 'best trial 1, value 0.75, parameters {"learning_rate": 0.0001}, cell search-0001' in text


def test_a_pruned_trials_cell_is_not_listed_as_unfinished(search_report):
    assert not (search_report / "failed_cells.csv").exists()


def test_mixing_benchmarks_is_refused(tmp_path):
    add_cell(tmp_path / "a", "zero", status="complete", kind="baseline", policy="zero", benchmark="metaworld")
    add_cell(tmp_path / "b", "zero", status="complete", kind="baseline", policy="zero", benchmark="calvin")
    with pytest.raises(ReportError, match="different benchmarks.*'calvin'.*'metaworld'"):
        write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report")


def test_mixing_splits_is_refused(tmp_path):
    add_cell(tmp_path / "a", "zero", status="complete", kind="baseline", policy="zero", split="ABC->D")
    add_cell(tmp_path / "b", "zero", status="complete", kind="baseline", policy="zero", split="D->D")
    with pytest.raises(ReportError, match="different splits of metaworld"):
        write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report")


def test_a_path_that_is_not_a_sweep_run_dir_is_refused(tmp_path):
    with pytest.raises(ReportError, match="not a sweep run directory"):
        write_report([tmp_path], tmp_path / "report")


def test_cli_report_writes_the_report_and_says_where(tmp_path):
    add_cell(tmp_path / "run", "zero", episode_records(np.random.default_rng(0), 0.0), status="complete",
             kind="baseline", policy="zero")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "index.html" in result.output and (tmp_path / "report" / "index.html").is_file()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_html_renders_alone_in_headless_chromium_with_every_image_loaded(sweep, tmp_path):
    alone = tmp_path / "index.html"  # copied away from the PNGs: the page must carry its own images
    shutil.copy(sweep[0] / "index.html", alone)
    dom = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", alone.as_uri()],
                         capture_output=True, text=True, timeout=60).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, "the page's script did not run"
    assert int(loaded[2]) == 5 and loaded[1] == loaded[2]  # success, main effects, data efficiency, cost, curves


# ---- SimplerEnv: sim-to-real agreement ----------------------------------------------------------------------

COKE, NEAR = "google_robot_pick_coke_can", "google_robot_move_near"
POLICY_HEAD = f"{SCRATCH} · policy-head · H=2 · L=4 · data 1"  # labels as the success table shows them
CONTINUOUS = f"{SCRATCH} · one-step-continuous · H=2 · L=4 · data 1"
KOSMOS = f"{PRETRAINED} · policy-head · H=2 · L=4 · data 1"


def add_simpler_cell(run_dir, cell_id, per_task, backbone=None, label=None, formulation=None, seed=0, policy=None,
                     benchmark="simpler", split="visual_matching"):
    """A committed cell (SimplerEnv unless told) whose benchmark score holds `per_task` success (`success/<task>`)."""
    trained = policy is None
    axes = dict(status="complete", kind="trained" if trained else "baseline", policy=policy or "trained",
                backbone=backbone, backbone_label=label, formulation=formulation,
                history=2 if trained else None, chunk=4 if trained else None, data_fraction=1.0 if trained else None)
    success = float(np.mean(list(per_task.values())))
    add_cell(run_dir, cell_id, benchmark=benchmark, split=split, seed=seed, episodes=100,
             successes=round(100 * success), success=success,
             scores={"success": success, **{f"success/{task}": rate for task, rate in per_task.items()}}, **axes)


@pytest.fixture(scope="module")
def simpler_run(tmp_path_factory):
    """Three configurations (one with two seeds) and a baseline, simulated success on two Google robot tasks."""
    run_dir = tmp_path_factory.mktemp("simpler") / "run"
    add_simpler_cell(run_dir, "ph-0", {COKE: 0.6, NEAR: 0.2}, "gpt-scratch", SCRATCH, "policy-head", seed=0)
    add_simpler_cell(run_dir, "ph-1", {COKE: 0.8, NEAR: 0.4}, "gpt-scratch", SCRATCH, "policy-head", seed=1)
    add_simpler_cell(run_dir, "continuous", {COKE: 0.5, NEAR: 0.5}, "gpt-scratch", SCRATCH, "one-step-continuous")
    add_simpler_cell(run_dir, "kosmos", {COKE: 0.1, NEAR: 0.0}, "kosmos2", PRETRAINED, "policy-head")
    add_simpler_cell(run_dir, "zero", {COKE: 0.0, NEAR: 0.0}, policy="zero")
    return run_dir


def write_real_world(path, rates):
    path.write_text(yaml.safe_dump(rates, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def simpler_report(simpler_run):
    real = write_real_world(simpler_run.parent / "real.yaml", {
        POLICY_HEAD: {COKE: 0.9, NEAR: 0.4}, CONTINUOUS: {COKE: 0.6, NEAR: 0.6}, KOSMOS: {COKE: 0.7},
        "zero": {NEAR: 0.1}})  # a baseline named by its policy
    out = simpler_run.parent / "report"
    write_report([simpler_run], out, real_world=real)
    return out


def test_sim_to_real_agreement_of_a_simpler_run_matches_the_hand_computed_values(simpler_report):
    table = pd.read_csv(simpler_report / "sim_to_real_agreement.csv").set_index("task")
    # coke can: real [0.9, 0.6, 0.7], sim [0.7 (seeds averaged), 0.5, 0.1]. Only continuous vs kosmos is misordered
    # (real gap 0.1, counted at both): MMRV = 0.2 / 3. Pearson: centred real [1/6, -2/15, -1/30], sim [4/15, 1/15,
    # -1/3]: 0.14/3 / sqrt(0.14/3 * 0.56/3) = 0.5.
    assert table.loc[COKE, ["policies", "mmrv", "pearson"]].tolist() == pytest.approx([3, 0.2 / 3, 0.5])
    # move near: real [0.4, 0.6, 0.1] is sim [0.3, 0.5, 0.0] + 0.1: no violation, r = 1
    assert table.loc[NEAR, ["policies", "mmrv", "pearson"]].tolist() == pytest.approx([3, 0.0, 1.0])
    assert table.loc["mean", ["policies", "mmrv", "pearson"]].tolist() == pytest.approx([4, 0.1 / 3, 0.75])


def test_sim_to_real_section_shows_simplerenvs_published_agreement_for_the_runs_tasks(simpler_report):
    published = pd.read_csv(simpler_report / "published_sim_to_real_agreement.csv").set_index("task")
    assert list(published.index) == [COKE, NEAR, "mean"]
    assert published.loc[COKE, ["policies", "mmrv", "pearson"]].tolist() == pytest.approx([6, 0.031333, 0.975434],
                                                                                        abs=1e-6)
    text = (simpler_report / "index.md").read_text()
    assert "## Sim-to-real agreement" in text and "6 reference policies" in text


def test_sim_to_real_section_without_real_world_rates_says_how_to_get_them(simpler_run, tmp_path):
    write_report([simpler_run], tmp_path / "report")
    assert "--real-world real.yaml" in (tmp_path / "report" / "index.md").read_text()
    assert not (tmp_path / "report" / "sim_to_real_agreement.csv").exists()
    assert (tmp_path / "report" / "published_sim_to_real_agreement.csv").is_file()


def test_real_world_rates_of_an_unknown_configuration_are_refused_listing_the_labels(simpler_run, tmp_path):
    real = write_real_world(tmp_path / "real.yaml", {"gpt-scratch": {COKE: 0.5}, CONTINUOUS: {COKE: 0.6}})
    with pytest.raises(ReportError, match=f"labelled 'gpt-scratch'; valid labels.*{re.escape(POLICY_HEAD)}"):
        write_report([simpler_run], tmp_path / "report", real_world=real)


def test_real_world_rates_of_a_task_the_run_did_not_evaluate_are_refused(simpler_run, tmp_path):
    real = write_real_world(tmp_path / "real.yaml", {CONTINUOUS: {"widowx_stack_cube": 0.6}})
    with pytest.raises(ReportError, match=f"'widowx_stack_cube'.*valid tasks: {COKE}, {NEAR}"):
        write_report([simpler_run], tmp_path / "report", real_world=real)


def test_real_world_rates_outside_the_unit_interval_are_refused_by_the_report(simpler_run, tmp_path):
    real = write_real_world(tmp_path / "real.yaml", {CONTINUOUS: {COKE: 60}})
    with pytest.raises(ReportError, match=r"must be a rate in \[0, 1\]; got 60"):
        write_report([simpler_run], tmp_path / "report", real_world=real)


def test_any_benchmark_gets_the_agreement_from_real_world_rates_but_only_simpler_a_published_yardstick(tmp_path):
    run = tmp_path / "run"
    for cell, rate, formulation in (("ph", 0.2, "policy-head"), ("continuous", 0.6, "one-step-continuous")):
        add_simpler_cell(run, cell, {"door-open": rate}, "gpt-scratch", SCRATCH, formulation, benchmark="metaworld",
                         split="ABC->D")
    write_report([run], tmp_path / "plain")
    assert "Sim-to-real agreement" not in (tmp_path / "plain" / "index.md").read_text()
    real = write_real_world(tmp_path / "real.yaml", {POLICY_HEAD: {"door-open": 0.1}, CONTINUOUS: {"door-open": 0.9}})
    write_report([run], tmp_path / "report", real_world=real)
    agreement = pd.read_csv(tmp_path / "report" / "sim_to_real_agreement.csv")
    assert agreement.task.tolist() == ["door-open", "mean"] and agreement.mmrv[0] == 0
    assert agreement.pearson[0] == pytest.approx(1, abs=1e-6)
    assert not (tmp_path / "report" / "published_sim_to_real_agreement.csv").exists()


def test_cli_report_takes_real_world_rates(simpler_run, tmp_path):
    pd.DataFrame({"configuration": [POLICY_HEAD, CONTINUOUS], COKE: [0.9, 0.6]}).to_csv(tmp_path / "real.csv",
                                                                                        index=False)
    result = CliRunner().invoke(app, ["report", str(simpler_run), "--out", str(tmp_path / "report"),
                                      "--real-world", str(tmp_path / "real.csv")])
    assert result.exit_code == 0, result.output
    row = pd.read_csv(tmp_path / "report" / "sim_to_real_agreement.csv").iloc[0]
    assert (row.task, row.policies, row.mmrv) == (COKE, 2, 0.0)


# ---- main effects ---------------------------------------------------------------------------------------------


def fixed_records(successes: int, episodes: int = 60):
    """`episodes` episodes of one task in one scene, seeds 0.., the first `successes` succeeding."""
    return [EpisodeRecord(task="door-open", scene="D", instruction="open the door", seed=seed,
                          success=seed < successes, steps=50, seconds=0.1) for seed in range(episodes)]


def add_design_cell(run_dir, backbone, formulation, successes, seed=0, records=None, **axes):
    cell_id = f"{backbone}-{formulation}-s{seed}" + "".join(f"-{key}{value}" for key, value in axes.items())
    add_cell(run_dir, cell_id, records or fixed_records(successes), status="complete", kind="trained",
             policy="trained",
             backbone=backbone, backbone_label=f"{backbone} (tiny, random init)", random_init=True,
             formulation=formulation, history=axes.get("history", 1), chunk=8, data_fraction=1.0, seed=seed,
             axes={"backbone": backbone, "formulation": formulation, "seed": seed, **axes})


def test_main_effects_pool_each_level_over_the_other_axes_and_resolve_only_clear_differences(tmp_path):
    """continuous beats discrete by 40 points on both backbones (resolved); the backbones differ by 1 point (not)."""
    from robovlms.report import read_sweep_runs
    from robovlms.report.main_effects import main_effects_table, pairwise_table

    run_dir = tmp_path / "run"
    for backbone, shift in (("gpt-scratch", 0), ("paligemma", 1)):
        add_design_cell(run_dir, backbone, "one-step-continuous", 45 + shift)
        add_design_cell(run_dir, backbone, "one-step-discrete", 21 + shift)
    add_cell(run_dir, "baseline-zero", fixed_records(0), status="complete", kind="baseline", policy="zero")
    runs = read_sweep_runs([run_dir])
    effects = main_effects_table(runs).set_index(["axis", "level"])
    assert set(effects.index.get_level_values("axis")) == {"backbone", "formulation"}  # baselines are no level
    continuous = effects.loc[("formulation", "one-step-continuous")]
    assert (continuous.cells, continuous.successes, continuous.episodes) == (2, 91, 120)
    assert (continuous.wilson_low, continuous.wilson_high) == pytest.approx(wilson_interval(91, 120))
    pairs = pairwise_table(runs).set_index("axis")
    formulation, backbone = pairs.loc["formulation"], pairs.loc["backbone"]
    assert formulation.matched_cells == 2 and formulation.episodes == 60
    assert formulation.difference == pytest.approx(24 / 60)
    assert formulation.low > 0.2 and formulation.resolved and formulation.p_holm < 0.05
    assert backbone.difference == pytest.approx(-1 / 60) and backbone.low < 0 <= backbone.high
    assert not backbone.resolved
    assert pairs.attrs["tests"] == 2


def test_levels_with_no_matched_cells_are_not_compared(tmp_path):
    from robovlms.report import read_sweep_runs
    from robovlms.report.main_effects import pairwise_table

    run_dir = tmp_path / "run"
    add_design_cell(run_dir, "gpt-scratch", "one-step-continuous", 50, learning_rate=0.001)
    add_design_cell(run_dir, "paligemma", "one-step-discrete", 10, learning_rate=0.01)
    pairs = pairwise_table(read_sweep_runs([run_dir]))
    assert set(pairs.axis) == {"backbone", "formulation", "learning_rate"}
    assert (pairs.matched_cells == 0).all() and pairs.difference.isna().all()


def test_the_report_has_a_main_effects_section_with_its_table_plot_and_differences(tmp_path):
    run_dir = tmp_path / "run"
    for seed in (0, 1):
        add_design_cell(run_dir, "gpt-scratch", "one-step-continuous", 45, seed=seed)
        add_design_cell(run_dir, "gpt-scratch", "one-step-discrete", 20, seed=seed)
    write_report([run_dir], tmp_path / "report")
    markdown = (tmp_path / "report" / "index.md").read_text()
    section = markdown[markdown.index("## Main effects"):]
    section = re.sub(" +", " ", section[:section.index("\n## ", 1)])
    assert "| formulation | one-step-continuous | 2 | 120 | 75% [67%, 82%] |" in section
    assert re.search(r"\| formulation \| one-step-continuous \| one-step-discrete \| 2 \| 60 \| \+42 \[\+\d+, \+\d+\] "
                     r"points \| resolved \(Holm p [\d.e-]+\) \|", section)
    assert "Holm-adjusted over the 1 comparison of this table" in section
    assert (tmp_path / "report" / "main_effects.png").is_file()
    assert set(pd.read_csv(tmp_path / "report" / "main_effect_differences.csv").columns) >= {
        "axis", "level_a", "level_b", "matched_cells", "episodes", "difference", "low", "high", "p_value", "p_holm",
        "resolved"}


def baseline_run(run_dir):
    """Against demo replay's 24/60: one cell succeeds on the same episodes and 9 more (33/60, Wilson intervals
    overlapping), one has replay's rate on other episodes, seeds 0 and 1 of one configuration pool to 40/120."""
    add_cell(run_dir, "baseline-zero", fixed_records(0), status="complete", kind="baseline", policy="zero")
    add_cell(run_dir, "baseline-replay", fixed_records(24), status="complete", kind="baseline", policy="replay")
    add_design_cell(run_dir, "paligemma", "one-step-discrete", 33)
    add_design_cell(run_dir, "gpt-scratch", "one-step-discrete", 24,
                    records=[dataclasses.replace(record, success=record.seed >= 36) for record in fixed_records(0)])
    for seed in (0, 1):
        add_design_cell(run_dir, "kosmos2", "one-step-discrete", 20, seed=seed)


def test_each_configuration_is_compared_with_each_baseline_on_matched_episodes(tmp_path):
    from robovlms.report import read_sweep_runs
    from robovlms.report.main_effects import baseline_comparison_table

    baseline_run(tmp_path / "run")
    table = baseline_comparison_table(read_sweep_runs([tmp_path / "run"]))
    assert len(table) == 3 * 2 and table.attrs["tests"] == 6
    rows = table.set_index([table.backbone_label.str.split().str[0], "baseline"])
    paired = rows.loc[("paligemma", "demo replay (baseline)")]
    assert paired.difference == pytest.approx(9 / 60) and paired.low > 0 and paired.resolved
    assert wilson_interval(33, 60)[0] < wilson_interval(24, 60)[1] and not paired.interval_above
    unpaired = rows.loc[("gpt-scratch", "demo replay (baseline)")]
    assert unpaired.difference == pytest.approx(0) and unpaired.low < 0 < unpaired.high and not unpaired.resolved
    seeds = rows.loc[("kosmos2", "demo replay (baseline)")]
    assert seeds.seeds == 2 and seeds.difference == pytest.approx(-4 / 60) and seeds.p_value < 0.05
    assert not seeds.resolved and seeds.p_holm > seeds.p_value  # its own interval excludes 0; the family's does not
    zero = rows.loc[("paligemma", "zero action (baseline)")]
    assert zero.difference == pytest.approx(33 / 60) and zero.resolved and zero.interval_above


def test_the_report_says_which_configurations_beat_every_baseline(tmp_path):
    baseline_run(tmp_path / "run")
    write_report([tmp_path / "run"], tmp_path / "report")
    markdown = (tmp_path / "report" / "index.md").read_text()
    section = markdown[markdown.index("## Against the baselines"):]
    section = re.sub(" +", " ", section[:section.index("\n## ", 1)])
    assert re.search(r"\| paligemma \(tiny, random init\) · one-step-discrete[^|]*\| \+55 \[\+\d+, \+\d+\] points; "
                     r"resolved \(Holm p [\d.e-]+\) \| \+15 \[\+\d+, \+\d+\] points; resolved \(Holm p [\d.e-]+\) \| yes "
                     r"\| no \|", section)
    assert re.search(r"\| gpt-scratch \(tiny, random init\) · one-step-discrete[^|]*\|[^|]*\| \+0 \[-\d+, \+\d+\] "
                     r"points; not resolved \(Holm p 1\) \| no \| no \|", section)
    assert "Holm-adjusted over the 6 comparisons of this table" in section
    assert set(pd.read_csv(tmp_path / "report" / "baseline_comparison.csv").columns) >= {
        "baseline", "seeds", "episodes", "difference", "low", "high", "p_value", "p_holm", "resolved",
        "interval_above"}


def two_cell_run(run_dir):
    rng = np.random.default_rng(3)
    add_trained_cell(run_dir, rng, "gpt-scratch-policy-head", "gpt-scratch", SCRATCH, "policy-head")
    add_trained_cell(run_dir, rng, "kosmos2-policy-head", "kosmos2", PRETRAINED, "policy-head")
    return run_dir / "cells" / "kosmos2-policy-head"


def test_a_truncated_result_json_is_listed_as_damaged_and_the_report_goes_on(tmp_path):
    result = two_cell_run(tmp_path / "run") / "result.json"
    result.write_text(result.read_text()[:40])
    write_report([tmp_path / "run"], tmp_path / "report")
    damaged = row_of(pd.read_csv(tmp_path / "report" / "failed_cells.csv"), cell_id="kosmos2-policy-head")
    assert damaged.status == "damaged" and damaged.error.startswith("result.json is truncated or not JSON")
    assert pd.read_csv(tmp_path / "report" / "success.csv").backbone_label.tolist() == [SCRATCH]


def test_a_result_json_with_an_unknown_key_is_listed_as_damaged(tmp_path):
    result = two_cell_run(tmp_path / "run") / "result.json"
    result.write_text(result.read_text().replace('"cell_id"', '"colour": "red", "cell_id"'))
    write_report([tmp_path / "run"], tmp_path / "report")
    damaged = row_of(pd.read_csv(tmp_path / "report" / "failed_cells.csv"), cell_id="kosmos2-policy-head")
    assert damaged.status == "damaged" and "unexpected keyword argument 'colour'" in damaged.error


def test_the_sweep_reads_a_damaged_result_json_as_unfinished(tmp_path):
    result = two_cell_run(tmp_path / "run") / "result.json"
    result.write_text("{")
    with pytest.warns(UserWarning, match="result.json is damaged.*counts as unfinished"):
        assert read_cell_result(result.parent) is None


def test_a_complete_cell_without_records_is_flagged_as_left_out_of_the_per_task_table(tmp_path):
    (two_cell_run(tmp_path / "run") / "records.parquet").unlink()
    write_report([tmp_path / "run"], tmp_path / "report")
    flagged = row_of(pd.read_csv(tmp_path / "report" / "failed_cells.csv"), cell_id="kosmos2-policy-head")
    assert flagged.status == "complete, records unreadable"
    assert flagged.error == ("records.parquet is missing: its episodes are left out of the per-task and per-scene "
                             "tables")
    assert "records.parquet is missing" in (tmp_path / "report" / "index.md").read_text()


def test_cells_whose_records_are_unreadable_are_compared_as_independent_samples_never_by_position(tmp_path):
    """60/120 against 50/120: aligned by position (the first k of each succeeding) they would read +8 [+4, +13]
    points, resolved; with kosmos2's records gone the two rates are compared as independent samples."""
    from robovlms.report import read_sweep_runs
    from robovlms.report.main_effects import pairwise_table

    run_dir = tmp_path / "run"
    add_design_cell(run_dir, "gpt-scratch", "one-step-continuous", 60, records=fixed_records(60, 120))
    add_design_cell(run_dir, "kosmos2", "one-step-continuous", 50, records=fixed_records(50, 120))
    (run_dir / "cells" / "kosmos2-one-step-continuous-s0" / "records.parquet").unlink()
    backbone = pairwise_table(read_sweep_runs([run_dir])).set_index("axis").loc["backbone"]
    assert backbone.difference == pytest.approx(10 / 120)
    assert backbone.low == pytest.approx(-0.043, abs=0.01) and backbone.high == pytest.approx(0.21, abs=0.01)
    assert not backbone.resolved


def test_episodes_are_paired_by_identity_whatever_order_the_records_hold(tmp_path):
    from robovlms.report import read_sweep_runs
    from robovlms.report.main_effects import pairwise_table

    def differences(order):
        run_dir = tmp_path / "-".join(map(str, order[:3]))
        add_design_cell(run_dir, "gpt-scratch", "one-step-continuous", 45)
        add_design_cell(run_dir, "kosmos2", "one-step-continuous", 20,
                        records=[fixed_records(20)[index] for index in order])
        return pairwise_table(read_sweep_runs([run_dir]))[["difference", "low", "high"]].to_numpy()

    shuffled = np.random.default_rng(0).permutation(60).tolist()
    assert differences(shuffled) == pytest.approx(differences(list(range(60))))


def test_every_table_of_evaluation_numbers_says_which_episodes_they_come_from(sweep):
    markdown = (sweep[0] / "index.md").read_text()
    assert markdown.startswith("# Sweep report: metaworld, split AB->CD, test episodes")
    caption = "*Evaluated on the test episodes of metaworld AB->CD: numbers for reporting, not for choosing settings.*"
    for section in ("## Success rate", "## Against the baselines", "## Main effects", "## Success per task",
                    "## Success per scene", "## Data efficiency", "## Cost"):
        body = markdown[markdown.index(section):]
        body = body[:body.index("\n## ", 1)]
        assert body.count(caption) == body.count("CSV: ["), section
    configuration = markdown[markdown.index("## Configuration of every cell"):]
    assert caption not in configuration


def test_a_run_evaluated_on_validation_episodes_says_so_and_cannot_be_pooled_with_a_test_run(tmp_path):
    rng = np.random.default_rng(0)
    add_trained_cell(tmp_path / "validation", rng, "a", "gpt-scratch", SCRATCH, "policy-head",
                     evaluation_split="validation")
    add_trained_cell(tmp_path / "test", rng, "a", "gpt-scratch", SCRATCH, "policy-head")
    write_report([tmp_path / "validation"], tmp_path / "report")
    markdown = (tmp_path / "report" / "index.md").read_text()
    assert "split AB->CD, validation episodes" in markdown
    assert "validation episodes of metaworld AB->CD: numbers for choosing settings, not for reporting" in markdown
    with pytest.raises(ReportError, match="cannot report different evaluation splits.*'test' in test; 'validation' "
                                          "in validation"):
        write_report([tmp_path / "validation", tmp_path / "test"], tmp_path / "mixed")


def test_a_setting_a_cells_grid_left_at_its_default_shows_the_value_not_a_blank(tmp_path):
    """A union of grids sets frame_stride in one grid only: the other cells' level is their config's value."""
    from robovlms.report import read_sweep_runs
    from robovlms.report.main_effects import cell_levels

    run_dir = tmp_path / "run"
    add_design_cell(run_dir, "gpt-scratch", "policy-head", 30, history=2, frame_stride=8)
    add_design_cell(run_dir, "gpt-scratch", "one-step-continuous", 30)
    result = read_cell_result(run_dir / "cells" / "gpt-scratch-one-step-continuous-s0")
    write_cell_result(run_dir / "cells" / "gpt-scratch-one-step-continuous-s0",
                      dataclasses.replace(result, config={"frame_stride": 1}))
    levels = cell_levels(read_sweep_runs([run_dir])).set_index("formulation")
    assert levels.frame_stride.to_dict() == {"policy-head": "8", "one-step-continuous": "1"}


def test_a_plugin_option_left_at_its_default_is_shown_as_the_default_not_a_blank(tmp_path):
    rng = np.random.default_rng(0)
    run_dir = tmp_path / "run"
    add_trained_cell(run_dir, rng, "bins16", "gpt-scratch", SCRATCH, "one-step-discrete",
                     settings={"formulation": {"name": "one-step-discrete", "options": {"bins": 16}}})
    add_trained_cell(run_dir, rng, "default", "gpt-scratch", SCRATCH, "one-step-discrete", seed=1,
                     settings={"formulation": {"name": "one-step-discrete", "options": {}}})
    write_report([run_dir], tmp_path / "report")
    success = pd.read_csv(tmp_path / "report" / "success.csv", keep_default_na=False)
    assert sorted(success["formulation.options.bins"]) == ["(default)", "16"]


# ---- plots and cost, readable ---------------------------------------------------------------------------------


def test_baselines_show_no_policy_step_cost(sweep):
    markdown = re.sub(" +", " ", (sweep[0] / "index.md").read_text())
    cost = markdown[markdown.index("## Cost"):]
    cost = cost[:cost.index("\n## ", 1)]
    baseline_rows = [line for line in cost.splitlines() if "(baseline) |" in line]
    assert baseline_rows and all("| - | - |" in line for line in baseline_rows)


def test_training_curves_get_one_panel_per_formulation():
    from robovlms.report.plots import training_curves_figure

    figure = training_curves_figure({"one-step-discrete": {"a": ([0, 10], [4.0, 3.0])},
                                     "policy-head": {"b": ([0, 10], [0.2, 0.1]), "c": ([0, 10], [0.3, 0.1])}})
    assert [axes.get_title(loc="left") for axes in figure.axes] == ["one-step-discrete", "policy-head"]
    assert [len(axes.get_lines()) for axes in figure.axes] == [1, 2]


def test_latency_points_are_numbered_and_named_in_a_legend_not_labelled_in_place():
    from robovlms.report.plots import latency_figure

    labels = ["gpt-scratch · policy-head", "gpt-scratch · interleaved"]
    figure = latency_figure(labels, [5.0, 5.1], [0.5, 0.52], [0.4, 0.42], [0.6, 0.62])
    axes = figure.axes[0]
    assert [text.get_text() for text in axes.texts] == ["1", "2"]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == [f"1  {labels[0]}", f"2  {labels[1]}"]


def drawn(figure):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def test_the_latency_axis_labels_its_ticks_in_plain_milliseconds():
    """Within one decade a log axis would label its ticks 2x10^1, 3x10^1."""
    from robovlms.report.plots import latency_figure

    figure = latency_figure(["a", "b", "c"], [18.0, 26.0, 41.0], [0.5, 0.52, 0.6], [0.4, 0.42, 0.5], [0.6, 0.62, 0.7])
    drawn(figure)
    axes = figure.axes[0]
    low, high = axes.get_xlim()
    labels = [tick.label1.get_text() for tick in axes.xaxis.get_major_ticks() + axes.xaxis.get_minor_ticks()
              if low <= tick.get_loc() <= high and tick.label1.get_visible() and tick.label1.get_text()]
    assert len(labels) >= 2 and all(re.fullmatch(r"\d+(\.\d+)?", label) for label in labels), labels


def test_each_training_curves_panels_step_label_lies_above_the_next_panels_title():
    """Level with it, "step" would read as part of the next panel's title line."""
    from robovlms.report.plots import training_curves_figure

    figure = training_curves_figure({f"formulation {index}": {f"cell {index}": ([0, 10], [1.0, 0.5])}
                                     for index in range(3)})
    renderer = drawn(figure)
    for upper, lower in zip(figure.axes, figure.axes[1:]):
        label = upper.xaxis.label.get_window_extent(renderer)
        title = lower._left_title.get_window_extent(renderer)
        assert label.y0 > title.y1


def test_a_panel_of_many_training_curves_is_as_tall_as_its_legend():
    """40 cells a formulation: each panel's legend stays beside its own panel."""
    from robovlms.report.plots import training_curves_figure

    figure = training_curves_figure({f"formulation {index}": {f"backbone {cell} · seed 0": ([0, 10], [1.0, 0.5])
                                                                for cell in range(40)} for index in range(2)})
    renderer = drawn(figure)
    legends = [axes.get_legend().get_window_extent(renderer) for axes in figure.axes]
    assert legends[0].y0 >= figure.axes[1].get_window_extent(renderer).y1  # above the next panel
    assert legends[1].y0 >= 0  # within the figure


def test_a_training_curves_panel_names_what_its_cells_share_in_its_title_not_in_every_label():
    from robovlms.report.sections import _common_parts_in_title

    curves = {"kosmos2 (tiny, random init) · policy-head · H=2 · L=8 · seed 0": "a",
              "kosmos2 (pretrained: data/pretrained/kosmos2-0123) · policy-head · H=2 · L=8 · seed 1 (failed)": "b"}
    title, labelled = _common_parts_in_title(("policy-head", curves))
    assert title == "policy-head · H=2 · L=8"
    assert labelled == {"kosmos2 (tiny, random init) · seed 0": "a",
                        "kosmos2 (pretrained: data/pretrained/kosmos2-0123) · seed 1 (failed)": "b"}
    assert _common_parts_in_title(("policy-head", {"gpt-scratch · H=2": "a"})) == ("policy-head",
                                                                                   {"gpt-scratch · H=2": "a"})


def test_an_axis_each_level_sets_is_named_not_matched_on(tmp_path):
    """The demo's formulations set their own history: one-step-continuous (H=1) and policy-head (H=2) are
    compared as configured, and the comparison says they also differ in history; history itself cannot be
    compared, since at H=1 and H=2 the formulations differ."""
    from robovlms.report import read_sweep_runs
    from robovlms.report.main_effects import pairwise_table

    run_dir = tmp_path / "run"
    add_design_cell(run_dir, "gpt-scratch", "one-step-continuous", 30, history=1)
    add_design_cell(run_dir, "gpt-scratch", "one-step-discrete", 20, history=1)
    add_design_cell(run_dir, "gpt-scratch", "policy-head", 40, history=2)
    pairs = pairwise_table(read_sweep_runs([run_dir])).set_index(["axis", "level_a", "level_b"])
    continuous_policy_head = pairs.loc[("formulation", "one-step-continuous", "policy-head")]
    assert continuous_policy_head.matched_cells == 1
    assert continuous_policy_head.difference == pytest.approx(-10 / 60)
    assert continuous_policy_head.also_differs == "history"
    assert pairs.loc[("formulation", "one-step-continuous", "one-step-discrete")].also_differs == ""
    assert pairs.loc[("history", "1", "2")].matched_cells == 0


def test_formulations_aliased_with_their_history_are_compared_as_configured_naming_it(tmp_path):
    """As in experiments/pretraining.yaml, each formulation sets its history and frame stride and each history
    its formulation: policy-head (H=2, stride 8) beats one-step-continuous (H=1) by 20 points on both backbones.
    The formulations are compared on their matched cells, naming history and frame stride; history and frame
    stride, the same comparison, have no rows of their own. (Aliased design axes, such as a backbone and a
    learning rate that vary together, stay uncompared: test_levels_with_no_matched_cells_are_not_compared.)"""
    from robovlms.report import read_sweep_runs
    from robovlms.report.main_effects import pairwise_table

    run_dir = tmp_path / "run"
    for backbone in ("kosmos2", "paligemma"):
        add_design_cell(run_dir, backbone, "one-step-continuous", 20, history=1, frame_stride=1)
        add_design_cell(run_dir, backbone, "policy-head", 40, history=2, frame_stride=8)
    pairs = pairwise_table(read_sweep_runs([run_dir]))
    assert set(pairs.axis) == {"backbone", "formulation"}
    formulations = pairs.set_index("axis").loc["formulation"]
    assert formulations.matched_cells == 2
    assert formulations.difference == pytest.approx(-20 / 60)
    assert formulations.also_differs == "history, frame_stride"


# ---- action objectives ----------------------------------------------------------------------------------------


def add_objective_cell(run_dir, backbone, formulation, objective, successes):
    """A trained cell whose formulation axis value carries its objective's options, as a sweep records it."""
    options = {} if objective is None else {"objective": objective.split()[0]}
    cell_id = f"{backbone}-{formulation}-{options.get('objective', 'none')}"
    add_cell(run_dir, cell_id, fixed_records(successes), status="complete", kind="trained", policy="trained",
             backbone=backbone, backbone_label=f"{backbone} (tiny, random init)", random_init=True,
             formulation=formulation, action_objective=objective, history=1, chunk=8, data_fraction=1.0,
             config={"formulation": {"name": formulation, "options": options}},
             axes={"backbone": backbone, "formulation": {"name": formulation, "options": options}, "seed": 0})


def test_the_action_objective_is_an_axis_of_its_own_compared_on_matched_cells(tmp_path):
    """flow-matching beats regression by 10 points on both backbones; the discrete cells, which have no
    objective, are no level of it, and the formulation's levels carry no objective options."""
    from robovlms.report import read_sweep_runs
    from robovlms.report.main_effects import main_effects_table, pairwise_table

    run_dir = tmp_path / "run"
    for backbone in ("gpt-scratch", "paligemma"):
        add_objective_cell(run_dir, backbone, "one-step-continuous", "regression (huber)", 30)
        add_objective_cell(run_dir, backbone, "one-step-continuous", "flow-matching (10 steps)", 36)
        add_objective_cell(run_dir, backbone, "one-step-discrete", None, 10)
    runs = read_sweep_runs([run_dir])
    effects = main_effects_table(runs)
    levels = {axis: set(group.level) for axis, group in effects.groupby("axis")}
    assert levels["action objective"] == {"regression (huber)", "flow-matching (10 steps)"}
    assert levels["formulation"] == {"one-step-continuous", "one-step-discrete"}
    pairs = pairwise_table(runs).set_index(["axis", "level_a", "level_b"])
    objective = pairs.loc[("action objective", "flow-matching (10 steps)", "regression (huber)")]
    assert objective.matched_cells == 2 and objective.difference == pytest.approx(6 / 60)
    assert runs.settings == ["action_objective"]


def test_the_report_shows_the_action_objective_in_its_success_table(tmp_path):
    run_dir = tmp_path / "run"
    add_objective_cell(run_dir, "gpt-scratch", "one-step-continuous", "regression (l1)", 30)
    add_objective_cell(run_dir, "gpt-scratch", "one-step-continuous", "diffusion (10 steps)", 20)
    write_report([run_dir], tmp_path / "report")
    markdown = re.sub(" +", " ", (tmp_path / "report" / "index.md").read_text())
    assert "action objective" in markdown
    assert "| one-step-continuous | diffusion (10 steps) |" in markdown.replace("| 1 | 8 | 1 ", "")


def test_one_objective_throughout_makes_no_axis_and_no_column(tmp_path):
    """A demo-like run: regression on the continuous cells, nothing on the discrete ones."""
    from robovlms.report import read_sweep_runs
    from robovlms.report.main_effects import main_effects_table, pairwise_table

    run_dir = tmp_path / "run"
    for backbone in ("gpt-scratch", "paligemma"):
        add_objective_cell(run_dir, backbone, "one-step-continuous", "regression (huber)", 30)
        add_objective_cell(run_dir, backbone, "one-step-discrete", None, 10)
    runs = read_sweep_runs([run_dir])
    assert set(main_effects_table(runs).axis) == {"backbone", "formulation"}
    assert "action_objective" not in runs.settings
    formulation = pairwise_table(runs).set_index("axis").loc["formulation"]  # the objective keeps no pair apart
    assert formulation.matched_cells == 2 and formulation.difference == pytest.approx(20 / 60)


def test_the_report_names_the_objective_options_the_formulations_have():
    from robovlms.action_objectives import OBJECTIVE_OPTIONS
    from robovlms.formulation import ContinuousActionConfig
    from robovlms.report.runs import OBJECTIVE_OPTIONS as REPORTED

    assert REPORTED == OBJECTIVE_OPTIONS
    assert set(OBJECTIVE_OPTIONS) <= {field.name for field in dataclasses.fields(ContinuousActionConfig)}
