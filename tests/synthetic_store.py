"""A small episode store of random frames, for tests that need real windows but no simulator."""

import numpy as np

from robovlms.data.store import Episode, EpisodeStoreWriter, FrameLayout

LAYOUT = FrameLayout(cameras=("rgb_static",), image_size=64, state_dim=4, action_dim=4)


def write_synthetic_store(path, episodes=4, length=12, seed=0):
    rng = np.random.default_rng(seed)
    with EpisodeStoreWriter(path, LAYOUT) as writer:
        for i in range(episodes):
            task = ("button-press-topdown", "door-open")[i % 2]
            actions = rng.uniform(-1, 1, (length, 4)).astype(np.float32)
            actions[:, -1] = np.where(rng.random(length) > 0.5, 1.0, -1.0)
            writer.add(Episode(task=task, instruction=f"do {task} now", scene="A", seed=i,
                               images={"rgb_static": rng.integers(0, 256, (length, 64, 64, 3), dtype=np.uint8)},
                               state=rng.normal(size=(length, 4)).astype(np.float32), actions=actions))
        return writer.commit()
