import numpy as np
import pytest

from robovlms.data.windows import WindowDataset, window_loader
from robovlms.errors import WindowError
from robovlms.data.store import Episode, EpisodeStoreWriter, FrameLayout

LAYOUT = FrameLayout(cameras=("rgb_static",), image_size=4, state_dim=1, action_dim=2)


@pytest.fixture
def counting_store(tmp_path):
    """Two episodes (lengths 5 and 3) whose every value is its global frame number."""
    with EpisodeStoreWriter(tmp_path / "store", LAYOUT) as writer:
        start = 0
        for task, length in [("a", 5), ("b", 3)]:
            frames = np.arange(start, start + length)
            writer.add(Episode(task=task, instruction=f"do {task}", scene="A", seed=0,
                               images={"rgb_static": np.broadcast_to(frames[:, None, None, None], (length, 4, 4, 3))
                                       .astype(np.uint8)},
                               state=frames[:, None].astype(np.float32),
                               actions=np.stack([frames, -frames], axis=1).astype(np.float32)))
            start += length
        return writer.commit()


def test_window_and_chunk_shapes(counting_store):
    dataset = WindowDataset(counting_store, history=3, chunk=2)
    assert len(dataset) == 8
    batch = dataset.__getitems__([0, 4, 7])
    assert batch["images"].shape == (3, 3, 1, 4, 4, 3)
    assert batch["state"].shape == (3, 3, 1)
    assert batch["actions"].shape == (3, 3, 2, 2)
    assert batch["action_mask"].shape == (3, 3, 2) and batch["frame_mask"].shape == (3, 3)
    assert batch["instruction"] == ["do a", "do a", "do b"]
    assert batch["task"].tolist() == [0, 0, 1]


def test_history_is_padded_with_the_first_frame_at_episode_start(counting_store):
    window = WindowDataset(counting_store, history=3, chunk=1)[5]  # first frame of episode b (global frame 5)
    assert window["state"][:, 0].tolist() == [5, 5, 5]
    assert window["images"][:, 0, 0, 0, 0].tolist() == [5, 5, 5]
    assert window["frame_mask"].tolist() == [False, False, True]


def test_chunk_is_padded_with_the_last_action_at_episode_end(counting_store):
    window = WindowDataset(counting_store, history=2, chunk=3)[3]  # frame 3 of episode a (frames 0-4)
    assert window["actions"][:, :, 0].tolist() == [[2, 3, 4], [3, 4, 4]]
    assert window["action_mask"].tolist() == [[True, True, True], [True, True, False]]
    last = WindowDataset(counting_store, history=1, chunk=3)[7]  # last frame of episode b
    assert last["actions"][0, :, 0].tolist() == [7, 7, 7]
    assert last["action_mask"][0].tolist() == [True, False, False]


def test_windows_never_cross_episodes(counting_store):
    dataset = WindowDataset(counting_store, history=3, chunk=3)
    batch = dataset.__getitems__(range(len(dataset)))
    task_of_frame = np.array([0] * 5 + [1] * 3)
    states = batch["state"][..., 0].numpy().astype(int)
    actions = batch["actions"][..., 0].numpy().astype(int)
    assert (task_of_frame[states] == batch["task"].numpy()[:, None]).all()
    assert (task_of_frame[actions] == batch["task"].numpy()[:, None, None]).all()


def test_episode_subset_selects_windows(counting_store):
    dataset = WindowDataset(counting_store, history=1, chunk=1, episodes=[1])
    assert len(dataset) == 3 and dataset[0]["instruction"] == "do b"


def test_window_larger_than_every_episode_is_an_error(counting_store):
    with pytest.raises(WindowError, match="longest episode .* has 5"):
        WindowDataset(counting_store, history=4, chunk=3)


def test_loader_yields_batches(counting_store):
    batches = list(window_loader(WindowDataset(counting_store, history=2, chunk=2), batch_size=3, seed=0))
    assert [len(b["instruction"]) for b in batches] == [3, 3, 2]
    again = list(window_loader(WindowDataset(counting_store, history=2, chunk=2), batch_size=3, seed=0))
    assert all((a["state"] == b["state"]).all() for a, b in zip(batches, again))


def test_history_frames_are_a_frame_stride_apart_and_padded_with_the_first(counting_store):
    window = WindowDataset(counting_store, history=3, chunk=1, frame_stride=2)[3]  # frame 3 of episode a
    assert window["state"][:, 0].tolist() == [0, 1, 3]  # frames -1 (padded with frame 0), 1, 3
    assert window["frame_mask"].tolist() == [False, True, True]


def test_a_window_whose_strided_history_outspans_every_episode_is_refused(counting_store):
    with pytest.raises(WindowError, match="frame stride 3"):
        WindowDataset(counting_store, history=3, chunk=1, frame_stride=3)
