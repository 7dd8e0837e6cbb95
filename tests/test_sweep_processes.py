"""Sweeps whose cells train in several processes (devices: 2, strategy: ddp, gloo on the CPU): each cell trains once,
in a process group of its own, with one worker or two, and resumes after a SIGKILL; and each worker process of a
machine gets its own GPUs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from optuna.trial import TrialState

import robovlms.sweep.gpus
from robovlms.errors import ConfigError
from robovlms.results import read_cell_results
from robovlms.sweep import expand_cells, load_sweep, prepare_sweep, run_sweep
from robovlms.sweep.gpus import assign_gpus
from robovlms.sweep.run import run_worker_processes
from robovlms.training.checkpoints import resume_point
from test_sweep import complete_trials_per_cell, make_stale, study_of, sweep_file

PATIENCE = 3600  # seconds: a loaded 2-core CI machine starts torch processes slowly; nothing depends on timing
TWO_PROCESS_CELLS = {"max_steps": 40, "batch_size": 4, "chunk": 2, "checkpoint_every": 2, "log_every": 1,
                     "cameras": ["rgb_static"], "execution": "chunk", "devices": 2, "strategy": "ddp",
                     "backbone": {"options": {"hidden_size": 32, "layers": 1}}}
THREE_CELLS = {"backbone": ["gpt-scratch"], "formulation": ["one-step-continuous", "policy-head", "one-step-discrete"]}


def two_process_sweep(tmp_path, demo_store, name):
    path = sweep_file(tmp_path, demo_store, name=name, grid=THREE_CELLS, train=TWO_PROCESS_CELLS, baselines=[])
    sweep = yaml.safe_load(path.read_text())
    sweep["run_dir"] = str(tmp_path / name)
    path.write_text(yaml.safe_dump(sweep))
    return path


def weights(train_dir):
    return torch.load(Path(train_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def assert_each_cell_trained_once_by_two_ranks(path, resumed=()):
    """One complete trial per cell and no other, each cell's result from its own trial, trained on 2 processes, in
    one Lightning run (two for a cell resumed after a kill)."""
    sweep = load_sweep(path)
    cells = [cell.cell_id for cell in expand_cells(sweep)]
    study = study_of(path)
    assert complete_trials_per_cell(study) == {cell: 1 for cell in cells}
    others = [t for t in study.get_trials() if t.state != TrialState.COMPLETE]
    assert [t.user_attrs["cell"] for t in others] == list(resumed)  # only a killed attempt, failed by its heartbeat
    results = {result.cell_id: result for result in read_cell_results(sweep.run_dir)}
    assert sorted(results) == sorted(cells) and len({r.trial for r in results.values()}) == len(cells)
    for cell in cells:
        train_dir = Path(sweep.run_dir) / "cells" / cell / "train"
        assert json.loads((train_dir / "training_time.json").read_text())["processes"] == 2
        assert len(list((train_dir / "logs").glob("version_*"))) == (2 if cell in resumed else 1)
    return results


def descendants(pid):
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as file:
                kids = [int(child) for child in file.read().split()]
        except FileNotFoundError:
            kids = []
        found += kids
        queue += kids
    return found


def alive(pid):
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_two_process_cells_train_once_each_in_a_group_of_their_own_with_one_or_two_workers(tmp_path, demo_store):
    one_worker = two_process_sweep(tmp_path, demo_store, "one_worker")
    started = time.monotonic()
    sweep = subprocess.Popen([sys.executable, "-m", "robovlms.cli", "sweep", str(one_worker)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cells_dir = tmp_path / "one_worker" / "cells"
    deadline = time.monotonic() + PATIENCE
    while not list(cells_dir.glob("*/train/checkpoints/step2.ckpt")):
        assert time.monotonic() < deadline and sweep.poll() is None, "the sweep never wrote a checkpoint"
        time.sleep(0.05)
    started_by_sweep = descendants(sweep.pid)
    os.kill(sweep.pid, signal.SIGKILL)  # the sweep alone, not its process group: its cell's ranks die with it
    sweep.wait()
    while any(alive(pid) for pid in started_by_sweep):
        assert time.monotonic() < deadline, "a rank outlived the killed sweep"
        time.sleep(0.2)
    killed = next(cells_dir.glob("*/train/checkpoints/step2.ckpt")).parents[2].name
    assert 2 <= resume_point(cells_dir / killed / "train" / "checkpoints", repair=False)[1] < 40
    make_stale(study_of(one_worker), study_of(one_worker).get_trials(states=(TrialState.RUNNING,))[0].number)

    status = run_sweep(one_worker)
    one_worker_seconds = time.monotonic() - started
    assert (status.done, status.failed) == (3, 0)
    one = assert_each_cell_trained_once_by_two_ranks(one_worker, resumed=[killed])

    two_workers = two_process_sweep(tmp_path, demo_store, "two_workers")
    started = time.monotonic()
    status = run_sweep(two_workers, workers=2)
    two_workers_seconds = time.monotonic() - started
    assert (status.done, status.failed) == (3, 0)
    two = assert_each_cell_trained_once_by_two_ranks(two_workers)

    # the killed and resumed cell, the same cell in the two-worker sweep and `robovlms train` of its settings agree
    settings = yaml.safe_load((cells_dir / killed / "train" / "config.yaml").read_text())
    alone = tmp_path / "train.yaml"
    alone.write_text(yaml.safe_dump({**settings, "run_dir": str(tmp_path / "alone")}))
    subprocess.run([sys.executable, "-m", "robovlms.cli", "train", str(alone), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL, timeout=PATIENCE)
    for cell, result in one.items():
        assert (result.success, result.final_train_loss) == (two[cell].success, two[cell].final_train_loss)
        two_workers_dir = tmp_path / "two_workers" / "cells" / cell / "train"
        assert_same_weights(weights(cells_dir / cell / "train"), weights(two_workers_dir))
    assert_same_weights(weights(cells_dir / killed / "train"), weights(tmp_path / "alone"))
    print(f"\n3 cells x 2 ranks: one worker, killed and resumed, {one_worker_seconds:.0f} s; two workers "
          f"{two_workers_seconds:.0f} s; {killed} equals `robovlms train` of its settings")


def test_each_worker_process_of_a_machine_sees_only_its_own_gpus(tmp_path, demo_store, monkeypatch):
    path = sweep_file(tmp_path, demo_store, name="gpus", grid={}, baselines=["zero"])
    run_sweep(path)  # finished: the workers below find no cell, report what they see and exit
    monkeypatch.setattr(robovlms.sweep.gpus, "visible_gpus", lambda: ["0", "1", "2", "3"])
    sweep, _, study, url = prepare_sweep(path)
    run_worker_processes(study.study_name, url, 2, Path(sweep.run_dir), assign_gpus([2, 2], 2), lambda: None)
    logs = Path(sweep.run_dir) / "logs"
    assert "worker 0/2: GPUs 0,1 (EGL device 0)" in (logs / "worker-0.log").read_text()
    assert "worker 1/2: GPUs 2,3 (EGL device 2)" in (logs / "worker-1.log").read_text()


@pytest.mark.parametrize("devices, workers, expected", [
    ([2, 2], 2, [["0", "1"], ["2", "3"]]), ([1], 4, [["0"], ["1"], ["2"], ["3"]]),
    (["auto"], 2, [["0", "1"], ["2", "3"]]), ([1, 2], 1, [["0", "1"]])])
def test_workers_get_disjoint_gpus_as_many_as_their_cells_train_on(monkeypatch, devices, workers, expected):
    monkeypatch.setattr(robovlms.sweep.gpus, "visible_gpus", lambda: ["0", "1", "2", "3"])
    assert assign_gpus(devices, workers) == expected


def test_more_workers_than_the_gpus_their_cells_need_are_refused(monkeypatch):
    monkeypatch.setattr(robovlms.sweep.gpus, "visible_gpus", lambda: ["0", "1", "2", "3"])
    with pytest.raises(ConfigError, match="3 workers whose cells train on 2 GPU\\(s\\) each need 6 GPUs; this machine "
                                          "has 4 \\(0, 1, 2, 3\\): run at most 2 worker\\(s\\) here"):
        assign_gpus([2], 3)


def test_a_machine_without_gpus_gives_its_workers_none(monkeypatch):
    monkeypatch.setattr(robovlms.sweep.gpus, "visible_gpus", lambda: [])
    assert assign_gpus([2], 2) is None
