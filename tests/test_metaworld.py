import functools

import av
import numpy as np
import pytest

from robovlms.baselines import MeanActionPolicy, ReplayPolicy, ZeroPolicy, baseline_factory
from robovlms.benchmark import EpisodeSpec, create_benchmark
from robovlms.benchmarks.metaworld import (MetaWorldBenchmark, evaluation_instructions, resolve_tasks,
                                           training_instructions, validation_instructions)
from robovlms.errors import ConfigError, UnknownNameError
from robovlms.rollout import evaluate

pytestmark = pytest.mark.slow


def test_demo_generation_keeps_successful_episodes_of_each_task_and_scene(demo_store):
    counts = demo_store.episodes.groupby(["task", "scene"]).size()
    assert counts.to_dict() == {("button-press-topdown", "A"): 2, ("button-press-topdown", "B"): 2,
                                ("door-open", "A"): 2, ("door-open", "B"): 2}
    assert demo_store.layout.image_size == 64 and demo_store.layout.action_dim == 4
    assert demo_store.metadata["benchmark"] == "metaworld"
    assert len(set(zip(demo_store.episodes["scene"], demo_store.episodes["seed"]))) == 4  # seeds recorded, distinct
    for _, row in demo_store.episodes.iterrows():
        assert row["instruction"] in training_instructions(row["task"])
    episode = demo_store.episode(0)
    assert episode.images["rgb_static"].shape == (len(episode), 64, 64, 3)
    assert np.abs(episode.actions).max() <= 1.0


def test_replaying_a_stored_demonstration_from_its_seed_succeeds(demo_store):
    benchmark = MetaWorldBenchmark(tasks="demo", cameras=("rgb_static",))
    episode = demo_store.episode(0)
    environment = benchmark.make_environment()
    environment.reset(EpisodeSpec(episode.task, episode.scene, episode.instruction, episode.seed))
    results = [environment.step(action, observe=False)[1] for action in episode.actions]
    environment.close()
    assert results[-1] and not any(results[:-1])


def test_scripted_expert_succeeds_and_zero_action_never_does():
    benchmark = MetaWorldBenchmark(tasks="button-press-topdown", cameras=("rgb_static",))
    specs = benchmark.evaluation_episodes("ABC->D", 10)
    expert = evaluate(benchmark, benchmark.scripted_expert(), specs, workers=2, progress=False)
    zero = evaluate(benchmark, functools.partial(ZeroPolicy, 4), specs, workers=2, progress=False)
    assert sum(r.success for r in expert) >= 9
    assert sum(r.success for r in zero) == 0 and all(r.steps == benchmark.max_steps for r in zero)


def test_baselines_roll_out_from_a_store(demo_store):
    benchmark = MetaWorldBenchmark(tasks=["button-press-topdown", "door-open"], cameras=("rgb_static",),
                                   max_steps=30)
    specs = benchmark.evaluation_episodes("ABC->D", 1)
    for factory in (functools.partial(MeanActionPolicy, str(demo_store.path)),
                    functools.partial(ReplayPolicy, str(demo_store.path), 0)):
        records = evaluate(benchmark, factory, specs, progress=False)
        assert [r.task for r in records] == ["button-press-topdown", "door-open"]


def test_mean_and_replay_baselines_are_refused_when_the_store_lacks_an_evaluated_task(demo_store):
    benchmark = MetaWorldBenchmark(tasks=["button-press-topdown", "drawer-open"], cameras=("rgb_static",))
    assert baseline_factory("zero", benchmark, demo_store.path)().step is not None
    for name in ("mean", "replay"):
        with pytest.raises(ConfigError, match=r"has none of \['drawer-open'\]"):
            baseline_factory(name, benchmark, demo_store.path)


def test_evaluation_uses_held_out_scene_seeds_and_instructions():
    benchmark = MetaWorldBenchmark(tasks="demo")
    evaluation = benchmark.evaluation_episodes("ABC->D", 4)
    training = benchmark.demonstration_episodes("ABC->D", 50)
    assert {s.scene for s in evaluation} == {"D"} and {s.scene for s in training} == {"A", "B", "C"}
    assert not {(s.task, s.seed) for s in evaluation} & {(s.task, s.seed) for s in training}
    for spec in evaluation:
        assert spec.instruction in evaluation_instructions(spec.task)
        assert spec.instruction not in training_instructions(spec.task)
    assert {s.scene for s in benchmark.evaluation_episodes("ABCD->D", 2)} == {"D"}
    assert {s.scene for s in benchmark.demonstration_episodes("ABCD->D", 1)} == set("ABCD")


@pytest.mark.parametrize("split, scene", [("ABC->D", "E"), ("D->D", "D"), ("ABCD->D", "D")])
def test_validation_episodes_share_no_seed_instruction_or_held_out_scene_with_the_test_episodes(split, scene):
    """ABC->D, whose test scene is held out from training, is validated in scene E, trained on by no split; D->D and
    ABCD->D, which train on their test scene, on fresh seeds of it."""
    benchmark = MetaWorldBenchmark(tasks="demo")
    validation = benchmark.validation_episodes(split, 30)
    test = benchmark.evaluation_episodes(split, 30)
    training = benchmark.demonstration_episodes(split, 50)
    assert {spec.scene for spec in validation} == {scene}
    assert len(validation) == len(test) == 4 * 30
    for other in (test, training):
        assert not {(s.task, s.scene, s.seed) for s in validation} & {(s.task, s.scene, s.seed) for s in other}
        assert not {(s.task, s.instruction) for s in validation} & {(s.task, s.instruction) for s in other}
    for spec in validation:
        assert spec.instruction in validation_instructions(spec.task)
    assert benchmark.split_episodes(split, "validation", 30) == validation
    assert benchmark.split_episodes(split, "test", 30) == test


def test_no_split_trains_on_the_validation_scene():
    with pytest.raises(ConfigError, match="scene E is the validation scene, never trained on; training scenes: A, B"):
        MetaWorldBenchmark(tasks="demo").demonstration_episodes("ABC->D", 1, scenes="AE")
    for split in MetaWorldBenchmark(tasks="demo").splits():
        assert "E" not in {spec.scene for spec in MetaWorldBenchmark(tasks="demo").demonstration_episodes(split, 1)}


def test_every_task_has_two_validation_instructions_of_its_own():
    for task in resolve_tasks("mt50"):
        held_out = validation_instructions(task)
        assert len(set(held_out)) == 2
        assert not set(held_out) & set(training_instructions(task) + evaluation_instructions(task))


def test_an_unknown_evaluation_split_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="unknown evaluation split 'dev'; valid choices: test, validation"):
        MetaWorldBenchmark(tasks="demo").split_episodes("ABC->D", "dev", 1)


def test_the_validation_scene_is_as_far_from_the_training_scenes_as_the_test_scene_and_far_from_it():
    """Mean absolute difference (grey levels) of each camera's first images of the demo tasks' episodes: E lies as
    far from its nearest training scene as D does (within a fifth), and further from D than that, so choosing on E
    neither favours nor reads D."""
    benchmark = MetaWorldBenchmark(tasks="demo", image_size=64)
    environment = benchmark.make_environment()
    images = {scene: {camera: np.stack([environment.reset(EpisodeSpec(task, scene, "x", 1_000_000 + seed)).images[
        camera].astype(float) for task in benchmark.tasks() for seed in range(2)]) for camera in benchmark.cameras}
        for scene in "ABCDE"}
    environment.close()
    for camera in benchmark.cameras:
        def distance(a, b):
            return np.abs(images[a][camera] - images[b][camera]).mean()

        nearest = {scene: min(distance(scene, training) for training in "ABC") for scene in "DE"}
        assert abs(nearest["E"] - nearest["D"]) < 0.2 * nearest["D"], (camera, nearest)
        assert distance("E", "D") > nearest["D"], camera


def test_scenes_change_the_rendered_images_and_images_are_upright():
    benchmark = MetaWorldBenchmark(tasks="button-press-topdown", image_size=96)
    environment = benchmark.make_environment()
    images = {scene: environment.reset(EpisodeSpec("button-press-topdown", scene, "x", 7)).images
              for scene in "ABCDE"}
    environment.close()
    for camera in ("rgb_static", "rgb_gripper"):
        assert images["A"][camera].shape == (96, 96, 3)
        for other in "BCDE":
            assert np.abs(images["A"][camera].astype(int) - images[other][camera].astype(int)).mean() > 5
    # Upright: the third-person camera sees the plain background wall in its top right corner and the
    # textured table and floor in its bottom right corner; upside down it would be the other way round.
    for scene in "ABCD":  # E's lower camera sees the button's box in that corner; upright is the renderer's doing
        static = images[scene]["rgb_static"].astype(float)
        assert static[:16, 48:].std() * 1.5 < static[-16:, 48:].std()


def test_rollouts_with_two_workers_equal_rollouts_with_one():
    benchmark = MetaWorldBenchmark(tasks=["button-press-topdown", "door-open"], cameras=("rgb_static",))
    specs = benchmark.evaluation_episodes("ABC->D", 2)
    one = evaluate(benchmark, benchmark.scripted_expert(), specs, workers=1, progress=False)
    two = evaluate(benchmark, benchmark.scripted_expert(), specs, workers=2, progress=False)
    assert [(r.task, r.seed, r.success, r.steps) for r in one] == [(r.task, r.seed, r.success, r.steps) for r in two]


def test_chunked_policy_observes_once_per_chunk():
    class CountingChunkPolicy:
        observations = 0

        def reset(self, spec):
            pass

        def step(self, observation):
            CountingChunkPolicy.observations += 1
            return np.zeros((8, 4), dtype=np.float32)

    benchmark = MetaWorldBenchmark(tasks="button-press-topdown", cameras=("rgb_static",), max_steps=40)
    records = evaluate(benchmark, CountingChunkPolicy, benchmark.evaluation_episodes("ABC->D", 1), progress=False)
    assert records[0].steps == 40 and CountingChunkPolicy.observations == 5


def test_videos_are_written_for_the_first_episodes_of_each_task(tmp_path):
    benchmark = MetaWorldBenchmark(tasks="button-press-topdown", cameras=("rgb_static",), max_steps=10)
    records = evaluate(benchmark, functools.partial(ZeroPolicy, 4), benchmark.evaluation_episodes("ABC->D", 2),
                       video_dir=tmp_path, videos_per_task=1, progress=False)
    assert "video" in records[0].extra and "video" not in records[1].extra
    with av.open(records[0].extra["video"]) as container:
        assert sum(1 for _ in container.decode(video=0)) == 11  # the initial frame and one after each step


def test_bad_names_list_the_valid_choices():
    with pytest.raises(UnknownNameError, match="unknown Meta-World task .*'open-sesame'.*button-press-topdown"):
        resolve_tasks(["open-sesame"])
    with pytest.raises(UnknownNameError, match="unknown split 'AB->C'; valid choices: ABC->D, ABCD->D, D->D"):
        MetaWorldBenchmark(tasks="demo").evaluation_episodes("AB->C", 1)
    with pytest.raises(UnknownNameError, match="unknown scene 'F'"):
        MetaWorldBenchmark(tasks="demo").demonstration_episodes("ABC->D", 1, scenes="AF")
    with pytest.raises(UnknownNameError, match="unknown camera 'rgb_tactile'"):
        MetaWorldBenchmark(cameras=("rgb_tactile",))
    with pytest.raises(ConfigError, match="64 to 224"):
        MetaWorldBenchmark(image_size=32)
    with pytest.raises(UnknownNameError, match="unknown benchmark 'libero'; valid choices: .*metaworld"):
        create_benchmark("libero")


def test_task_sets():
    assert len(resolve_tasks("mt10")) == 10 and len(resolve_tasks("mt50")) == 50
    assert resolve_tasks("demo") == ("button-press-topdown", "door-open", "plate-slide", "window-open")
    assert resolve_tasks(["reach-v3"]) == ("reach",)


def test_records_save_to_parquet_and_csv(tmp_path):
    from robovlms.records import records_frame

    benchmark = MetaWorldBenchmark(tasks="button-press-topdown", cameras=("rgb_static",), max_steps=5)
    records = evaluate(benchmark, functools.partial(ZeroPolicy, 4), benchmark.evaluation_episodes("ABC->D", 2),
                       progress=False)
    frame = records_frame(records)
    frame.to_parquet(tmp_path / "records.parquet", index=False)
    frame.to_csv(tmp_path / "records.csv", index=False)
    loaded = __import__("pandas").read_parquet(tmp_path / "records.parquet")
    assert list(loaded["seed"]) == [r.seed for r in records] and list(loaded["extra"]) == ["{}", "{}"]
