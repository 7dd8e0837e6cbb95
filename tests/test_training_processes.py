"""A configuration of several processes (devices: 2, DDP over gloo on the CPU) trains in ranks started for it, which
die with the process that started them, stop together, and resume as an uninterrupted run would."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from synthetic_store import write_synthetic_store

from robovlms.training import TrainingProcessError, train
from robovlms.training.checkpoints import resume_point

TWO_PROCESSES = {"formulation": {"name": "policy-head", "options": {"objective": "flow-matching"}}, "history": 2,
                 "chunk": 2, "batch_size": 2, "augment": True, "devices": 2, "strategy": "ddp", "log_every": 1,
                 "backbone": {"options": {"hidden_size": 32, "layers": 1}}}
PATIENCE = 1800  # seconds: a loaded CI machine starts two torch processes slowly; nothing here depends on timing


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("synthetic") / "store")


def config(store, run_dir, **overrides):
    return {"store": str(store.path), "run_dir": str(run_dir), **TWO_PROCESSES, **overrides}


def final_weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def losses(run_dir):
    """Each step's logged loss (rank 0's micro-batch); a resumed run's later attempt wins where they overlap."""
    frames = [pd.read_csv(path) for path in sorted(Path(run_dir).glob("logs/version_*/metrics.csv"))]
    frame = pd.concat(frames).dropna(subset=["train/loss"])
    return frame.drop_duplicates("step", keep="last").set_index("step")["train/loss"]


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(child) for child in file.read().split()]


def gone(pids):
    return all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
               for pid in pids)


def start_training(store, run_dir, tmp_path, **settings):
    """`robovlms train` in a session of its own, once its ranks exist and rank 0 wrote a checkpoint."""
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config(store, run_dir, **settings)))
    launcher = subprocess.Popen([sys.executable, "-m", "robovlms.cli", "train", str(path), "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + PATIENCE
    while not list((run_dir / "checkpoints").glob("step*.ckpt")):
        assert launcher.poll() is None and time.monotonic() < deadline, "training never wrote a checkpoint"
        time.sleep(0.05)
    return launcher, children(launcher.pid)


def wait_until_gone(pids):
    deadline = time.monotonic() + PATIENCE
    while not gone(pids):
        assert time.monotonic() < deadline, f"processes {pids} outlived their launcher"
        time.sleep(0.2)


@pytest.mark.slow
def test_two_processes_killed_with_their_launcher_resume_with_the_uninterrupted_batches_and_weights(store,
                                                                                                    tmp_path):
    settings = {"max_steps": 40, "checkpoint_every": 2}
    uninterrupted = train(config(store, tmp_path / "straight", **settings))
    assert yaml.safe_load((uninterrupted / "training_time.json").read_text())["processes"] == 2

    launcher, ranks = start_training(store, tmp_path / "killed", tmp_path, **settings)
    assert len(ranks) == 2
    os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone: its ranks must not outlive it
    launcher.wait()
    wait_until_gone(ranks)
    _, killed_at = resume_point(tmp_path / "killed" / "checkpoints", repair=False)
    assert 2 <= killed_at < 40, "the run finished before it was killed"

    resumed = train(config(store, tmp_path / "killed", **settings))
    logged, straight_logged = losses(resumed), losses(uninterrupted)
    # the killed attempt's last rows can die in the CSV logger's buffer; the resumed attempt logs every step it trains
    assert set(range(killed_at, 40)) <= set(logged.index)
    pd.testing.assert_series_equal(logged, straight_logged.loc[logged.index], rtol=0, atol=0)
    straight = final_weights(uninterrupted)
    for key, value in final_weights(resumed).items():
        assert torch.equal(value, straight[key]), key


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_other_and_the_launcher_names_it(store, tmp_path):
    launcher, ranks = start_training(store, tmp_path / "run", tmp_path, max_steps=400, checkpoint_every=2)
    rank_one = next(pid for pid in ranks if b"LOCAL_RANK=1\x00" in Path(f"/proc/{pid}/environ").read_bytes())
    os.kill(rank_one, signal.SIGKILL)
    output = launcher.communicate(timeout=PATIENCE)[0].decode()
    assert launcher.returncode == 2, output[-3000:]
    assert "error: rank 1 of the training in" in output and "was killed by SIGKILL" in output, output[-3000:]
    wait_until_gone(ranks)


@pytest.mark.slow
def test_a_validation_hook_that_raises_stops_every_rank_after_that_validation(store, tmp_path):
    class Pruned(Exception):
        pass

    validations = []

    def prune_at_the_second(step, metrics):
        validations.append((step, metrics))
        if len(validations) == 2:
            raise Pruned

    with pytest.raises(Pruned):
        train(config(store, tmp_path / "run", max_steps=40, checkpoint_every=20, validation_fraction=0.25,
                     validate_every=2), on_validation=prune_at_the_second)
    assert [step for step, _ in validations] == [2, 4] and all("val/loss" in m for _, m in validations)
    assert torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4


def test_a_rank_reports_robovlms_errors_as_themselves(store, tmp_path):
    from robovlms.training.launch import _rebuilt_error
    from robovlms.errors import UnknownNameError

    error = _rebuilt_error({"type": "robovlms.errors.UnknownNameError", "message": "unknown backbone 'x'"}, 0, "run")
    assert isinstance(error, UnknownNameError) and str(error) == "unknown backbone 'x'"
    error = _rebuilt_error({"type": "torch.OutOfMemoryError", "message": "CUDA out of memory"}, 1, "run")
    assert isinstance(error, TrainingProcessError)
    assert str(error) == "rank 1 of the training in run failed: torch.OutOfMemoryError: CUDA out of memory"
