import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from robovlms.cli import app
from robovlms.errors import ConfigError, StoreError
from robovlms.data.store import Episode, EpisodeStore, EpisodeStoreWriter, FrameLayout, verify_store

LAYOUT = FrameLayout(cameras=("rgb_static", "rgb_gripper"), image_size=8, state_dim=3, action_dim=4)


def synthetic_episode(rng, task, length, scene="A", seed=0):
    return Episode(task=task, instruction=f"do {task}", scene=scene, seed=seed,
                   images={c: rng.integers(0, 256, (length, 8, 8, 3), dtype=np.uint8) for c in LAYOUT.cameras},
                   state=rng.normal(size=(length, 3)).astype(np.float32),
                   actions=rng.uniform(-1, 1, (length, 4)).astype(np.float32))


def write_store(path, episodes, **kwargs):
    with EpisodeStoreWriter(path, LAYOUT, **kwargs) as writer:
        for episode in episodes:
            writer.add(episode)
        return writer.commit()


def test_round_trip_returns_every_episode_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    episodes = [synthetic_episode(rng, task, length, scene, seed)
                for task, length, scene, seed in [("a", 5, "A", 1), ("b", 9, "B", 2), ("a", 3, "C", 3)]]
    store = write_store(tmp_path / "store", episodes)
    reopened = EpisodeStore(tmp_path / "store")
    assert len(reopened) == 3 and reopened.frames == 17
    for index, original in enumerate(episodes):
        loaded = reopened.episode(index)
        assert (loaded.task, loaded.scene, loaded.seed, loaded.instruction) == (
            original.task, original.scene, original.seed, original.instruction)
        np.testing.assert_array_equal(loaded.actions, original.actions)
        np.testing.assert_array_equal(loaded.state, original.state)
        for camera in LAYOUT.cameras:
            np.testing.assert_array_equal(loaded.images[camera], original.images[camera])
    assert store.tasks() == ["a", "b"]


def test_action_statistics_equal_numpy(tmp_path):
    rng = np.random.default_rng(1)
    episodes = [synthetic_episode(rng, "a", n) for n in (30, 50, 20)]
    store = write_store(tmp_path / "store", episodes)
    actions = np.concatenate([e.actions for e in episodes]).astype(np.float64)
    stats = store.action_statistics
    np.testing.assert_allclose(stats.p01, np.percentile(actions, 1, axis=0))
    np.testing.assert_allclose(stats.p99, np.percentile(actions, 99, axis=0))
    np.testing.assert_allclose(stats.mean, actions.mean(axis=0))
    np.testing.assert_allclose(stats.std, actions.std(axis=0))
    np.testing.assert_allclose(stats.min, actions.min(axis=0))
    np.testing.assert_allclose(stats.max, actions.max(axis=0))


def test_fraction_subsets_are_deterministic_nested_and_per_task(tmp_path):
    rng = np.random.default_rng(2)
    episodes = [synthetic_episode(rng, task, 2) for task in ["a"] * 20 + ["b"] * 10]
    store = write_store(tmp_path / "store", episodes)
    tenth, half, full = store.subset(0.1, seed=3), store.subset(0.5, seed=3), store.subset(1.0, seed=3)
    assert tenth == store.subset(0.1, seed=3)
    assert set(tenth) <= set(half) <= set(full) == set(range(30))
    tasks = store.episodes["task"]
    assert sorted(tasks[tenth]) == ["a", "a", "b"] and list(tasks[half]).count("b") == 5
    assert store.subset(0.5, seed=4) != half
    with pytest.raises(ConfigError, match="fraction"):
        store.subset(0.0)


def test_few_shot_subsets_take_at_most_n_episodes_of_each_task_nested(tmp_path):
    rng = np.random.default_rng(2)
    store = write_store(tmp_path / "store", [synthetic_episode(rng, task, 2) for task in ["a"] * 20 + ["b"] * 3])
    two, five = store.subset(1.0, seed=3, per_task=2), store.subset(1.0, seed=3, per_task=5)
    tasks = store.episodes["task"]
    assert sorted(tasks[two]) == ["a", "a", "b", "b"] and sorted(tasks[five]) == ["a"] * 5 + ["b"] * 3
    assert set(two) <= set(five) <= set(store.subset(1.0, seed=3))
    with pytest.raises(ConfigError, match="at least 1"):
        store.subset(1.0, per_task=0)


def test_existing_store_is_not_overwritten_without_overwrite(tmp_path):
    rng = np.random.default_rng(3)
    write_store(tmp_path / "store", [synthetic_episode(rng, "a", 4)])
    with pytest.raises(StoreError, match="--overwrite"):
        EpisodeStoreWriter(tmp_path / "store", LAYOUT)
    write_store(tmp_path / "store", [synthetic_episode(rng, "b", 6)], overwrite=True)
    assert EpisodeStore(tmp_path / "store").tasks() == ["b"]


def test_store_of_another_schema_version_is_refused(tmp_path):
    write_store(tmp_path / "store", [synthetic_episode(np.random.default_rng(4), "a", 4)])
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    meta["schema_version"] = 99
    (tmp_path / "store" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema version 99"):
        EpisodeStore(tmp_path / "store")


def test_truncated_array_file_is_reported(tmp_path):
    write_store(tmp_path / "store", [synthetic_episode(np.random.default_rng(5), "a", 4)])
    with open(tmp_path / "store" / "actions.f32", "r+b") as file:
        file.truncate(10)
    with pytest.raises(StoreError, match="actions.f32 is missing or truncated"):
        EpisodeStore(tmp_path / "store")


def test_episode_of_wrong_shape_is_rejected(tmp_path):
    episode = synthetic_episode(np.random.default_rng(6), "a", 4)
    episode.actions = episode.actions[:, :2]
    with EpisodeStoreWriter(tmp_path / "store", LAYOUT) as writer, pytest.raises(ConfigError, match="actions"):
        writer.add(episode)


CRASHING_WRITER = textwrap.dedent("""
    import os, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_store import LAYOUT, synthetic_episode
    from robovlms.data.store import EpisodeStoreWriter
    rng = np.random.default_rng(0)
    writer = EpisodeStoreWriter({path!r}, LAYOUT, resume=True)
    for index in range(len(writer), 6):
        writer.add(synthetic_episode(rng, "a", 5, seed=index))
        if index == 2 and {crash}:
            os._exit(9)  # killed mid-write: no commit, no clean-up
    writer.commit()
""")


def test_crash_mid_write_leaves_no_loadable_store_and_resume_finishes_it(tmp_path):
    path = tmp_path / "store"
    tests = str(__import__("pathlib").Path(__file__).parent)
    crashed = subprocess.run([sys.executable, "-c", CRASHING_WRITER.format(tests=tests, path=str(path), crash=True)])
    assert crashed.returncode == 9
    with pytest.raises(StoreError, match="half-written"):
        EpisodeStore(path)
    with pytest.raises(StoreError, match="half-written"):
        EpisodeStore(tmp_path / "store.partial")
    resumed = subprocess.run([sys.executable, "-c", CRASHING_WRITER.format(tests=tests, path=str(path), crash=False)])
    assert resumed.returncode == 0
    store = EpisodeStore(path)
    assert list(store.episodes["seed"]) == [0, 1, 2, 3, 4, 5]
    assert store.frames == 30


def flip_byte(path, offset):
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0xFF]))


def test_verify_of_an_intact_store_checks_every_file(tmp_path):
    write_store(tmp_path / "store", [synthetic_episode(np.random.default_rng(7), "a", 4)])
    assert sorted(verify_store(tmp_path / "store")) == sorted(
        ["episodes.parquet", "images.rgb_static.u8", "images.rgb_gripper.u8", "state.f32", "actions.f32"])


@pytest.mark.parametrize("filename", ["images.rgb_gripper.u8", "actions.f32"])
def test_verify_names_a_file_whose_bytes_changed(tmp_path, filename):
    write_store(tmp_path / "store", [synthetic_episode(np.random.default_rng(8), "a", 4)])
    flip_byte(tmp_path / "store" / filename, 5)
    EpisodeStore(tmp_path / "store")  # opening checks only what is cheap
    with pytest.raises(StoreError, match=rf"{filename} changed since the store was written"):
        verify_store(tmp_path / "store")


def test_store_written_without_checksums_opens_and_verify_says_so(tmp_path):
    write_store(tmp_path / "store", [synthetic_episode(np.random.default_rng(9), "a", 4)])
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    del meta["checksums"]
    (tmp_path / "store" / "meta.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(app, ["data", "verify", str(tmp_path / "store")])
    assert result.exit_code == 0
    assert "has no checksums" in " ".join(result.output.split())


def test_episode_with_non_finite_actions_is_refused_naming_it(tmp_path):
    rng = np.random.default_rng(10)
    bad = synthetic_episode(rng, "b", 4, scene="B", seed=3)
    bad.actions[2, 1] = np.nan
    with EpisodeStoreWriter(tmp_path / "store", LAYOUT) as writer:
        writer.add(synthetic_episode(rng, "a", 4))
        with pytest.raises(StoreError, match=r"episode 1 \(task 'b', scene 'B', seed 3\) has non-finite actions at "
                                             r"frames \[2\]"):
            writer.add(bad)
        assert len(writer) == 1


def test_episode_with_non_finite_state_is_refused(tmp_path):
    bad = synthetic_episode(np.random.default_rng(11), "a", 4)
    bad.state[0, 0] = np.inf
    with EpisodeStoreWriter(tmp_path / "store", LAYOUT) as writer, pytest.raises(StoreError, match="non-finite state"):
        writer.add(bad)


def test_store_holding_non_finite_actions_names_the_episode_on_open(tmp_path):
    rng = np.random.default_rng(12)
    write_store(tmp_path / "store", [synthetic_episode(rng, "a", 4), synthetic_episode(rng, "b", 4)])
    actions = np.memmap(tmp_path / "store" / "actions.f32", np.float32, "r+", shape=(8, 4))
    actions[5, 0] = np.nan  # as written by a robovlms that did not refuse it: the statistics are NaN too
    actions.flush()
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    meta["statistics"]["actions"]["mean"][0] = float("nan")
    (tmp_path / "store" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"non-finite actions in 1 episode\(s\), first episode 1 \(task 'b'"):
        EpisodeStore(tmp_path / "store")


def test_episode_starting_beyond_the_frames_is_refused_on_open(tmp_path):
    write_store(tmp_path / "store", [synthetic_episode(np.random.default_rng(13), "a", 4)])
    index = pd.read_parquet(tmp_path / "store" / "episodes.parquet")
    index.loc[0, "start"] = 10
    index.to_parquet(tmp_path / "store" / "episodes.parquet", index=False)
    with pytest.raises(StoreError, match=r"1 episode\(s\) lie outside the store's 4 frames \(episode 0 starts at 10"):
        EpisodeStore(tmp_path / "store")


def test_missing_episode_index_is_named(tmp_path):
    write_store(tmp_path / "store", [synthetic_episode(np.random.default_rng(14), "a", 4)])
    (tmp_path / "store" / "episodes.parquet").unlink()
    with pytest.raises(StoreError, match=r"episodes.parquet is missing \(the store's episode index\)"):
        EpisodeStore(tmp_path / "store")


def test_corrupt_episode_index_is_named(tmp_path):
    write_store(tmp_path / "store", [synthetic_episode(np.random.default_rng(15), "a", 4)])
    (tmp_path / "store" / "episodes.parquet").write_bytes(b"PAR1" + b"\0" * 40 + b"PAR1")
    with pytest.raises(StoreError, match=r"episodes.parquet is corrupt"):
        EpisodeStore(tmp_path / "store")


def test_truncated_meta_json_is_named(tmp_path):
    write_store(tmp_path / "store", [synthetic_episode(np.random.default_rng(16), "a", 4)])
    meta = tmp_path / "store" / "meta.json"
    meta.write_text(meta.read_text()[:50])
    with pytest.raises(StoreError, match=r"meta.json is truncated or corrupt"):
        EpisodeStore(tmp_path / "store")


# ---- a store refused in one line, whatever is wrong with it ----------------------------------------------------


def rewrite_index(path, change):
    index = pd.read_parquet(path / "episodes.parquet")
    index = change(index)
    index.to_parquet(path / "episodes.parquet", index=False)


def three_episodes(tmp_path):
    rng = np.random.default_rng(20)
    return write_store(tmp_path / "store", [synthetic_episode(rng, task, 4, seed=seed)
                                           for seed, task in enumerate(["a", "b", "a"])]).path


def with_text_start(index):
    return index.assign(start=index.start.astype(str))


def with_nan_length(index):
    return index.assign(length=index.length.astype(float).where(index.episode != 1))


def without_a_task(index):
    return index.assign(task=index.task.where(index.episode != 2))


def empty(index):
    return index.iloc[:0]


def overlapping(index):
    return index.assign(start=[0, 2, 8])


def duplicated(index):
    return pd.concat([index, index.iloc[[1]]], ignore_index=True)


@pytest.mark.parametrize("change, message", [
    (with_text_start, r"column 'start' must hold integers; it holds text"),
    (with_nan_length, r"column 'length' has missing values \(episode 1\)"),
    (without_a_task, r"column 'task' has missing values \(episode 2\)"),
    (empty, r"holds no episodes"),
    (overlapping, r"episodes 0 and 1 overlap \(frames 0-3 and 2-5\)"),
    (duplicated, r"episode 1 appears 2 times"),
])
def test_a_malformed_episode_index_is_refused_in_one_line(tmp_path, change, message):
    path = three_episodes(tmp_path)
    rewrite_index(path, change)
    with pytest.raises(StoreError, match=message) as error:
        EpisodeStore(path)
    assert "\n" not in str(error.value) and "episodes.parquet" in str(error.value)
    result = CliRunner().invoke(app, ["data", "info", str(path)])
    assert result.exit_code != 0 and isinstance(result.exception, StoreError)


def test_non_finite_actions_behind_finite_statistics_are_refused_on_open(tmp_path):
    path = three_episodes(tmp_path)
    actions = np.memmap(path / "actions.f32", np.float32, "r+", shape=(12, 4))
    actions[9, 2] = np.nan  # the file edited after its statistics were computed
    actions.flush()
    with pytest.raises(StoreError, match=r"non-finite actions in 1 episode\(s\), first episode 2 \(task 'a'"):
        EpisodeStore(path)


def test_verify_refuses_a_meta_json_without_a_files_checksum(tmp_path):
    path = three_episodes(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    del meta["checksums"]["files"]["actions.f32"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="meta.json records no checksum for actions.f32"):
        verify_store(path)


def test_verify_refuses_a_checksum_of_a_file_that_is_not_the_stores(tmp_path):
    path = three_episodes(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    meta["checksums"]["files"]["../outside"] = "0" * 64
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"meta.json records a checksum for '../outside', which is not a file of"):
        verify_store(path)


def written_long_ago(path):
    """As a store written before today's work: its files' times are well in the past."""
    for file in path.iterdir():
        os.utime(file, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))


def test_opening_a_store_verified_keeps_the_verdict_until_a_file_changes(tmp_path, monkeypatch):
    import robovlms.data.store as store_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = three_episodes(tmp_path)
    written_long_ago(path)
    hashed = []
    sha256 = store_module._sha256
    monkeypatch.setattr(store_module, "_sha256", lambda file, *args: hashed.append(file.name) or sha256(file, *args))
    EpisodeStore(path, verify=True)
    assert len(hashed) == 5
    EpisodeStore(path, verify=True)
    assert len(hashed) == 5  # the second time costs nothing
    flip_byte(path / "state.f32", 3)  # a same-size edit, which opening alone cannot see
    with pytest.raises(StoreError, match="state.f32 changed since the store was written"):
        EpisodeStore(path, verify=True)
    assert hashed[5:] == ["state.f32"]


def test_a_store_edited_within_the_clocks_resolution_is_never_taken_from_the_cache(tmp_path, monkeypatch):
    import robovlms.data.store as store_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(store_module, "RACY_NS", 86_400 * 10 ** 9)  # the files are fresh however slow the machine
    path = three_episodes(tmp_path)
    EpisodeStore(path, verify=True)
    stat = (path / "actions.f32").stat()
    flip_byte(path / "actions.f32", 0)
    os.utime(path / "actions.f32", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # edited in the same clock tick
    with pytest.raises(StoreError, match="actions.f32 changed since the store was written"):
        EpisodeStore(path, verify=True)


def a_same_size_edit(path):
    flip_byte(path / "actions.f32", 0)


def test_training_refuses_a_store_whose_bytes_changed_since_it_was_written(tmp_path, monkeypatch):
    from synthetic_store import write_synthetic_store

    from robovlms.training import train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = write_synthetic_store(tmp_path / "store")
    a_same_size_edit(store.path)
    with pytest.raises(StoreError, match="actions.f32 changed since the store was written"):
        train({"store": str(store.path), "run_dir": str(tmp_path / "run"), "max_steps": 1})
    assert not (tmp_path / "run").exists()


def test_a_sweep_refuses_a_store_whose_bytes_changed_before_it_makes_a_study(tmp_path, demo_store, monkeypatch):
    import shutil

    import yaml

    from robovlms.sweep import prepare_sweep

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = shutil.copytree(demo_store.path, tmp_path / "store")
    a_same_size_edit(store)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "edited", "run_dir": str(tmp_path / "run"), "store": {"path": str(store)},
                                    "benchmark": {"options": {"tasks": ["button-press-topdown", "door-open"]}},
                                    "train": {"max_steps": 1}}))
    with pytest.raises(StoreError, match="actions.f32 changed since the store was written"):
        prepare_sweep(path)
    assert not (tmp_path / "run").exists()


def test_evaluation_refuses_a_store_whose_bytes_changed_since_it_was_written(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = three_episodes(tmp_path)
    a_same_size_edit(path)
    result = CliRunner().invoke(app, ["evaluate", "--policy", "zero", "--store", str(path)])
    assert isinstance(result.exception, StoreError), result.output
    assert "actions.f32 changed since the store was written" in str(result.exception)


def test_a_worker_refuses_to_join_with_a_store_whose_bytes_changed(tmp_path, demo_store, monkeypatch):
    import shutil

    import yaml

    from robovlms.sweep import join_study, prepare_sweep

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = shutil.copytree(demo_store.path, tmp_path / "store")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "joined", "run_dir": str(tmp_path / "run"), "store": {"path": str(store)},
                                    "benchmark": {"options": {"tasks": ["button-press-topdown", "door-open"]}},
                                    "baselines": ["zero"], "grid": {}}))
    _, _, study, url = prepare_sweep(path)
    a_same_size_edit(store)  # this machine's copy of the store, damaged since the sweep began
    with pytest.raises(StoreError, match="actions.f32 changed since the store was written"):
        join_study(url, study.study_name)
