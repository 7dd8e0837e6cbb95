"""Writes that a full disk or a kill cannot leave half done: atomic files and checkpoints, failures that are recorded
whatever the disk allows, and the leftovers of a killed writer cleaned when the work resumes."""

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from synthetic_store import write_synthetic_store

from robovlms.atomic_files import write_atomically, write_json_atomically
from robovlms.results import read_cell_results
from robovlms.training import read_checkpoint, train

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("synthetic") / "store")


def training(store, run_dir, **overrides):
    return {"store": str(store.path), "run_dir": str(run_dir), "formulation": {"name": "one-step-continuous"},
            "chunk": 2, "batch_size": 8, "max_steps": 2, "checkpoint_every": 2, "log_every": 1, **overrides}


def temporaries(directory):
    return sorted(path.name for path in Path(directory).rglob("*.tmp"))


def a_dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def disk_full_after(count):
    def write(temporary):
        with open(temporary, "wb") as file:
            file.write(b"x" * count)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def test_a_write_that_fails_partway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    write_json_atomically(tmp_path / "result.json", {"status": "complete"})
    with pytest.raises(OSError, match="No space left on device"):
        write_atomically(tmp_path / "result.json", disk_full_after(10))
    assert (tmp_path / "result.json").read_text() == '{\n  "status": "complete"\n}'
    assert temporaries(tmp_path) == []


RESUME_UNDER_A_FILE_SIZE_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    from robovlms.training import train
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    train({config!r}, progress=False)
""")


def test_a_checkpoint_write_that_fails_partway_leaves_the_last_checkpoint_whole(store, tmp_path):
    checkpoints = train(training(store, tmp_path / "run")) / "checkpoints"
    size = (checkpoints / "last.ckpt").stat().st_size
    resumed = subprocess.run([sys.executable, "-c", RESUME_UNDER_A_FILE_SIZE_LIMIT.format(
        limit=size // 2, config=training(store, tmp_path / "run", max_steps=4))], capture_output=True, text=True,
        timeout=900, check=False)
    assert resumed.returncode != 0 and "File too large" in resumed.stderr
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 2
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.ckpt", "step2.ckpt"]


def test_resuming_removes_a_killed_writers_temporaries_and_truncated_checkpoints(store, tmp_path):
    run_dir = train(training(store, tmp_path / "run", max_steps=4))
    checkpoints = run_dir / "checkpoints"
    dead = a_dead_pid()
    for leftover in (checkpoints / f".last.ckpt.{dead}.tmp", run_dir / f".training_time.json.{dead}.tmp"):
        leftover.write_bytes(b"")
    with open(checkpoints / "step4.ckpt", "r+b") as file:
        file.truncate(1000)
    with pytest.warns(UserWarning, match="step4.ckpt is truncated or corrupt .* removed"):
        train(training(store, run_dir, max_steps=6))
    assert temporaries(run_dir) == []
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.ckpt", "step2.ckpt", "step6.ckpt"]


def test_a_live_writers_temporary_is_left_alone(store, tmp_path):
    run_dir = train(training(store, tmp_path / "run"))
    live = run_dir / "checkpoints" / f".last.ckpt.{os.getppid()}.tmp"
    live.write_bytes(b"")
    train(training(store, run_dir, max_steps=4))
    assert live.exists()


def one_cell_sweep(tmp_path, store, run_dir, name="disk", hidden_size=32):
    """A trained cell and the zero baseline."""
    sweep = {"name": name, "run_dir": str(run_dir),
             "benchmark": {"name": "metaworld", "split": "ABC->D",
                           "options": {"tasks": ["button-press-topdown"], "max_steps": 15}},
             "store": {"path": str(store.path)},
             "train": {"max_steps": 2, "batch_size": 4, "chunk": 2, "checkpoint_every": 2, "log_every": 1,
                       "cameras": ["rgb_static"], "execution": "chunk",
                       "backbone": {"options": {"hidden_size": hidden_size, "layers": 1}}},
             "grid": {"formulation": ["one-step-continuous"]}, "baselines": ["zero"],
             "evaluation": {"episodes_per_task": 1, "latency_steps": 2}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_a_sweep_started_again_removes_what_a_killed_sweep_left_half_written(tmp_path, demo_store):
    from robovlms.sweep import run_sweep

    run_dir = tmp_path / "run"
    path = one_cell_sweep(tmp_path, demo_store, run_dir)
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "grid": {}}))  # the baseline alone
    dead = a_dead_pid()
    leftovers = [run_dir / f".sweep.yaml.{dead}.tmp", run_dir / "results" / f".summary.csv.{dead}.tmp",
                 run_dir / "cells" / "baseline-zero" / f".result.json.{dead}.tmp"]
    for leftover in leftovers:
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_bytes(b"")
    assert run_sweep(path).done == 1
    assert [leftover for leftover in leftovers if leftover.exists()] == []


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failure_that_cannot_be_written_still_ends_its_trial_and_the_sweep(tmp_path, demo_store, monkeypatch):
    import robovlms.sweep.failures
    import robovlms.sweep.one_cell
    from robovlms.sweep import load_sweep, run_sweep, storage_url

    path = one_cell_sweep(tmp_path, demo_store, tmp_path / "run")
    monkeypatch.setattr(robovlms.sweep.one_cell, "train_cell", no_space)
    monkeypatch.setattr(robovlms.sweep.failures, "write_cell_result", no_space)  # the disk is still full
    status = run_sweep(path)
    assert (status.done, status.failed) == (1, 1)
    study = optuna.load_study(study_name="disk", storage=storage_url(load_sweep(path)))
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    assert "No space left on device" in failed.user_attrs["error"]
    assert not study.get_trials(states=(TrialState.RUNNING,))
    monkeypatch.undo()  # space freed: the cell whose failure was never written runs again
    assert run_sweep(path).done == 2


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB filesystem of its own (tmpfs), to fill up; removed after the test."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True, check=False)
    except FileNotFoundError:
        pytest.skip("no `mount` command to make a small filesystem to fill")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True, check=False)


def fill(disk, leave):
    """Take all but `leave` bytes of a filesystem."""
    ballast = disk / "ballast"
    with open(ballast, "wb") as file:
        file.truncate(0)
        chunk = b"\0" * (1 << 20)
        while shutil.disk_usage(disk).free > leave + len(chunk):
            file.write(chunk)
            file.flush()
    return ballast


def sweep_command(path, *options):
    return subprocess.run([sys.executable, "-m", "robovlms.cli", "sweep", str(path), *options], capture_output=True,
                          text=True, timeout=1800, check=False)


@pytest.mark.slow
def test_a_full_disk_fails_the_cell_it_stops_and_the_sweep_goes_on_leaving_nothing_half_written(tmp_path, demo_store,
                                                                                               small_disk):
    from robovlms.sweep import load_sweep, storage_url

    run_dir = small_disk / "run"
    path = one_cell_sweep(tmp_path, demo_store, run_dir, hidden_size=64)
    ballast = fill(small_disk, leave=2 << 20)  # room for every file of the sweep but the trained cell's checkpoint

    full = sweep_command(path)
    assert full.returncode == 1 and "Traceback" not in full.stdout + full.stderr, full.stdout + full.stderr
    assert "1 of 2 cells done, 1 failed" in " ".join(full.stdout.split())
    (failed,) = [result for result in read_cell_results(run_dir) if result.status == "failed"]
    assert "No space left on device" in failed.error
    assert temporaries(run_dir) == []
    for checkpoint in run_dir.rglob("*.ckpt"):
        read_checkpoint(checkpoint)  # whole, or not there
    study = optuna.load_study(study_name="disk", storage=storage_url(load_sweep(path)))
    assert not study.get_trials(states=(TrialState.RUNNING,))

    ballast.unlink()
    freed = sweep_command(path, "--retry-failed")
    assert freed.returncode == 0 and "2 of 2 cells done, 0 failed" in " ".join(freed.stdout.split()), freed.stdout


def test_a_ledger_that_cannot_be_written_stops_the_sweep_in_one_line(tmp_path, demo_store, monkeypatch):
    import sqlalchemy

    import robovlms.sweep.worker
    from robovlms.errors import LedgerError
    from robovlms.sweep import run_sweep

    def disk_full(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, Exception("database or disk is full"))

    path = one_cell_sweep(tmp_path, demo_store, tmp_path / "run")
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "grid": {}}))  # the baseline alone
    monkeypatch.setattr(robovlms.sweep.worker, "_tell", disk_full)
    with pytest.raises(LedgerError, match=r"the sweep's ledger sqlite:///.*optuna.db cannot be written \(database or "
                                          r"disk is full\); what was committed is kept") as error:
        run_sweep(path)
    assert "\n" not in str(error.value)
