"""Generating demonstrations: a store that falls short of the requested episodes is not committed silently."""

from types import SimpleNamespace

import numpy as np
import pytest

from robovlms.benchmark import EpisodeSpec
from robovlms.data import demonstrations
from robovlms.data.demonstrations import generate_demonstrations
from robovlms.errors import StoreError


class ExpertFailingInSceneA:
    """Two tasks in scenes A and C; the expert never succeeds in scene A."""

    name, cameras, image_size, state_dim, action_dim = "stand-in", ("rgb_static",), 8, 2, 3

    def options(self):
        return {}

    def scripted_expert(self):
        return None

    def demonstration_episodes(self, split, episodes_per_scene, attempt=0, scenes=None):
        return [EpisodeSpec(task=task, scene=scene, instruction=task, seed=attempt * 1000 + i)
                for task in ("push", "reach") for scene in "AC" for i in range(episodes_per_scene)]


def run_expert(benchmark, policy_factory, specs, **options):
    for spec in specs:
        trajectory = SimpleNamespace(images={"rgb_static": [np.zeros((8, 8, 3), np.uint8)] * 3},
                                     states=[np.zeros(2, np.float32)] * 3, actions=[np.zeros(3, np.float32)] * 3)
        yield spec, SimpleNamespace(success=spec.scene != "A"), trajectory


@pytest.fixture(autouse=True)
def stand_in_rollouts(monkeypatch):
    monkeypatch.setattr(demonstrations, "run_episodes", run_expert)


def test_a_store_short_of_episodes_is_not_committed_and_the_message_names_what_is_short(tmp_path):
    with pytest.raises(StoreError, match=r"fell short of 2 episodes per task and scene after 3 rounds: scene A: "
                                         r"push 0/2, reach 0/2\. The 4 episodes written are kept in .*store.partial"):
        generate_demonstrations(ExpertFailingInSceneA(), "A,C", 2, tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
    assert (tmp_path / "store.partial").is_dir()


def test_a_short_store_is_committed_with_allow_short_and_records_its_shortfall(tmp_path):
    with pytest.raises(StoreError):
        generate_demonstrations(ExpertFailingInSceneA(), "A,C", 2, tmp_path / "store", progress=False)
    with pytest.warns(UserWarning, match="scene A: push 0/2, reach 0/2"):
        store = generate_demonstrations(ExpertFailingInSceneA(), "A,C", 2, tmp_path / "store", resume=True,
                                        allow_short=True, progress=False)
    assert len(store) == 4 and set(store.episodes.scene) == {"C"}
    assert store.metadata["shortfall"] == {"push/A": 2, "reach/A": 2}


def sweep_generating(tmp_path, store, episodes, scenes="AB"):
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "grown", "run_dir": str(tmp_path / "run"), "baselines": ["zero"], "grid": {},
        "benchmark": {"options": {"tasks": ["button-press-topdown", "door-open"]}},
        "store": {"path": str(store.path), "generate": {"episodes": episodes, "scenes": scenes}}}))
    return path


@pytest.mark.parametrize("episodes, scenes, message", [
    (5, "AB", "store.generate.episodes is 5, but the store .* was generated with 2 episodes per task and scene"),
    (2, "ABC", "store.generate.scenes is 'ABC', but the store .* was generated from scenes 'AB'"),
])
def test_generation_settings_that_differ_from_the_existing_stores_are_refused_with_what_to_do(
        tmp_path, demo_store, episodes, scenes, message):
    import yaml

    from robovlms.errors import ConfigError
    from robovlms.sweep import prepare_sweep

    prepare_sweep(sweep_generating(tmp_path, demo_store, 2))
    with pytest.raises(ConfigError, match=f"{message}.*point store.path at a new directory"):
        prepare_sweep(sweep_generating(tmp_path, demo_store, episodes, scenes))
    recorded = yaml.safe_load((tmp_path / "run" / "sweep.yaml").read_text())["store"]["generate"]
    assert (recorded["episodes"], recorded["scenes"]) == (2, "AB")
    assert len(demo_store) == len(type(demo_store)(demo_store.path))  # the store is as it was
