"""Importing a CALVIN split (its own format) into an episode store: annotated windows only, resumable."""

import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from robovlms.benchmarks import calvin_import
from robovlms.data.calvin_import import annotated_windows, import_calvin
from robovlms.cli import app
from robovlms.errors import ConfigError, StoreError
from robovlms.data.store import EpisodeStore
from calvin_split import WINDOWS, frame_arrays, write_calvin_split


@pytest.fixture
def split(tmp_path):
    return write_calvin_split(tmp_path / "task_ABC_D")


def test_every_annotated_window_becomes_one_episode_with_its_frames(split, tmp_path):
    store = import_calvin(split, tmp_path / "store", image_size=64, progress=False)
    assert len(store) == len(WINDOWS)
    assert list(store.episodes.task) == [task for _, _, task, _ in WINDOWS]
    assert list(store.episodes.instruction) == [instruction for *_, instruction in WINDOWS]
    assert list(store.episodes.length) == [end - start + 1 for start, end, _, _ in WINDOWS]  # end is inclusive
    assert list(store.episodes.scene) == ["B", "B", "B", "A", "A"]
    assert store.layout.cameras == ("rgb_static", "rgb_gripper") and store.layout.image_size == 64
    second = store.episode(1)  # frames 4..9, overlapping the first window as CALVIN's annotations do
    np.testing.assert_array_equal(second.state[:, 0], np.arange(4, 10))
    np.testing.assert_allclose(second.actions, np.stack([frame_arrays(f)["rel_actions"] for f in range(4, 10)]),
                               rtol=1e-6)
    assert second.images["rgb_static"].shape == (6, 64, 64, 3)
    assert (second.images["rgb_gripper"][0] == (4 * 7) % 256).all()  # resized from 84x84, still that frame
    assert store.metadata["benchmark"] == "calvin" and store.metadata["scenes"] == ["A", "B"]
    assert store.action_statistics.p99[-1] == 1.0 and store.layout.state_dim == 15


def test_an_interrupted_import_resumes_without_reading_finished_windows_again(split, tmp_path, monkeypatch):
    frame_file = split / "training" / "episode_0000022.npz"  # inside the fourth window
    intact = frame_file.read_bytes()
    frame_file.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(StoreError, match="episode_0000022.npz is truncated"):
        import_calvin(split, tmp_path / "store", image_size=64, progress=False)
    assert not (tmp_path / "store").exists() and (tmp_path / "store.partial").exists()

    frame_file.write_bytes(intact)
    read = []
    original = calvin_import.read_frame
    monkeypatch.setattr(calvin_import, "read_frame", lambda folder, frame: read.append(frame) or original(folder, frame))
    store = import_calvin(split, tmp_path / "store", image_size=64, resume=True, progress=False)
    assert read == list(range(20, 26)) + list(range(26, 31))  # only the fourth and fifth windows
    fresh = import_calvin(split, tmp_path / "fresh", image_size=64, progress=False)
    assert store.episodes.equals(fresh.episodes)
    np.testing.assert_array_equal(store.images["rgb_static"], fresh.images["rgb_static"])
    np.testing.assert_array_equal(store.actions, fresh.actions)


def test_a_single_scene_split_is_scene_d(tmp_path):
    split = write_calvin_split(tmp_path / "task_D_D", scenes={})
    assert {window.scene for window in annotated_windows(split / "training")} == {"D"}


def test_a_folder_that_is_not_a_calvin_split_is_refused_with_what_was_found(tmp_path):
    (tmp_path / "something" / "else").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no training/ folder .*found: else"):
        import_calvin(tmp_path / "something", tmp_path / "store")


def test_missing_annotations_are_named(split, tmp_path):
    (split / "training" / "lang_annotations" / "auto_lang_ann.npy").unlink()
    with pytest.raises(ConfigError, match="auto_lang_ann.npy is missing"):
        import_calvin(split, tmp_path / "store")


def test_a_missing_frame_file_is_named(split, tmp_path):
    (split / "training" / "episode_0000013.npz").unlink()
    with pytest.raises(StoreError, match="episode_0000013.npz is missing"):
        import_calvin(split, tmp_path / "store", progress=False)


def test_the_command_line_imports_and_reports_errors_in_one_line(split, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "import-calvin", str(split), str(tmp_path / "store"), "--image-size", "64"])
    assert result.exit_code == 0, result.output
    assert len(EpisodeStore(tmp_path / "store")) == len(WINDOWS)
    failed = subprocess.run([sys.executable, "-m", "robovlms.cli", "data", "import-calvin", str(tmp_path / "nowhere"),
                             str(tmp_path / "other")], capture_output=True, text=True)
    assert failed.returncode == 2 and "not a CALVIN split" in failed.stdout and "Traceback" not in failed.stderr


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("filename", ["lang_annotations/auto_lang_ann.npy", "scene_info.npy"])
def test_a_pickled_file_that_would_run_code_is_refused_without_running_it(split, tmp_path, filename):
    marker = tmp_path / "code-ran"
    np.save(split / "training" / filename, np.array({"info": RunsCode(marker)}, dtype=object))
    with pytest.raises(StoreError, match=rf"{filename} is not a plain CALVIN data file: its pickle would create "
                                         r"posix.system, which is refused"):
        annotated_windows(split / "training")
    assert not marker.exists()
