"""The CALVIN and SimplerEnv adapters against the real simulators, each in its own Python environment (opt-in:
`pytest -m real_simulators`; docs/calvin.md and docs/simpler.md say how to install them).

ROBOVLMS_CALVIN_PYTHON names the interpreter of CALVIN's environment and ROBOVLMS_CALVIN_CONF the calvin
repository's calvin_models/conf folder; ROBOVLMS_SIMPLER_PYTHON the interpreter of SimplerEnv's (a wrapper script
may set VK_ICD_FILENAMES and LD_PRELOAD first). Tests of a simulator whose variables are unset are skipped. Tests
that step print the simulator's steps per second.
"""

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from robovlms.benchmark import EpisodeSpec
from robovlms.errors import MissingDependencyError, SimulatorDied

pytestmark = pytest.mark.real_simulators

CALVIN_PYTHON = os.environ.get("ROBOVLMS_CALVIN_PYTHON")
CALVIN_CONF = os.environ.get("ROBOVLMS_CALVIN_CONF")
SIMPLER_PYTHON = os.environ.get("ROBOVLMS_SIMPLER_PYTHON")
needs_calvin = pytest.mark.skipif(not (CALVIN_PYTHON and CALVIN_CONF),
                                  reason="ROBOVLMS_CALVIN_PYTHON and ROBOVLMS_CALVIN_CONF are not set")
needs_simpler = pytest.mark.skipif(not SIMPLER_PYTHON, reason="ROBOVLMS_SIMPLER_PYTHON is not set")


class Zero:
    """Does nothing; counts its steps."""

    def __init__(self):
        self.steps = 0

    def reset(self, spec):
        pass

    def step(self, observation):
        self.steps += 1
        return np.zeros(7, dtype=np.float32)


def steps_per_second(environment, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        environment.step(np.zeros(7), observe=True)
    return steps / (time.perf_counter() - started)


# ---- CALVIN ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def calvin():
    from robovlms.benchmarks.calvin import CalvinBenchmark

    benchmark = CalvinBenchmark(image_size=200, calvin_conf=CALVIN_CONF, python=CALVIN_PYTHON)
    benchmark.check_available()
    return benchmark


@needs_calvin
def test_calvin_renders_with_egl_and_steps_both_cameras(calvin):
    environment = calvin.make_environment()
    try:
        spec = calvin.evaluation_episodes("ABC->D", 1)[0]
        environment.reset(spec)
        observation = environment.begin_subtask(spec.subtasks[0])
        assert environment.table.uses_egl()
        assert {name: image.shape for name, image in observation.images.items()} == {
            "rgb_static": (200, 200, 3), "rgb_gripper": (200, 200, 3)}
        assert observation.images["rgb_static"].std() > 10  # a rendered scene, not a blank frame
        print(f"CALVIN, EGL, both cameras: {steps_per_second(environment, 30):.1f} steps/s")
    finally:
        environment.close()


@needs_calvin
def test_two_calvin_evaluations_run_in_one_process(calvin):
    from robovlms.rollout import evaluate

    specs = calvin.evaluation_episodes("ABC->D", 1)
    for _ in range(2):
        records = evaluate(calvin, Zero, specs, progress=False)
        assert records[0].subtasks_completed == 0 and records[0].steps == 360


@needs_calvin
def test_a_calvin_simulator_killed_mid_chain_is_reported_as_killed_during_its_step(calvin, monkeypatch):
    from robovlms.rollout import evaluate

    environment = calvin.make_environment()
    monkeypatch.setattr(calvin, "make_environment", lambda: environment)

    class KilledAtItsThirdStep(Zero):
        def step(self, observation):
            if self.steps == 2:
                os.kill(environment.process.pid, signal.SIGKILL)
            return super().step(observation)

    with pytest.raises(SimulatorDied, match=r"killed by SIGKILL .* during step\(\); it printed nothing") as error:
        evaluate(calvin, KilledAtItsThirdStep, calvin.evaluation_episodes("ABC->D", 1), progress=False)
    assert "close()" not in str(error.value) and environment.process.log_path.exists()
    environment.process.log_path.unlink()


@needs_calvin
def test_a_zero_action_leaves_calvins_gripper_open(calvin):
    environment = calvin.make_environment()
    try:
        spec = calvin.evaluation_episodes("ABC->D", 1)[0]
        environment.reset(spec)
        environment.begin_subtask(spec.subtasks[0])
        for _ in range(5):
            observation, _ = environment.step(np.zeros(7), observe=True)
        assert observation.state[14] == 1.0 and observation.state[6] > 0.07  # open, fingers apart
    finally:
        environment.close()


# ---- SimplerEnv -----------------------------------------------------------------------------------------------------

def simpler(task: str):
    from robovlms.benchmarks.simpler import SimplerBenchmark

    benchmark = SimplerBenchmark(tasks=task, image_size=224, python=SIMPLER_PYTHON)
    benchmark.check_available()
    return benchmark


@needs_simpler
def test_pick_coke_can_runs_in_simpler_envs_own_environment():
    benchmark = simpler("google_robot_pick_coke_can")
    environment = benchmark.make_environment()
    try:
        spec = benchmark.evaluation_episodes("visual_matching", 1)[0]
        observation = environment.reset(spec)
        assert observation.instruction == "pick coke can" and observation.images["rgb_static"].shape == (224, 224, 3)
        print(f"SimplerEnv pick coke can: {steps_per_second(environment, 10):.1f} steps/s")
    finally:
        environment.close()


def arm_motion(step: int) -> np.ndarray:
    """Raw policy actions that move the arm out, down and back, turn the wrist and close the gripper."""
    out = step < 6
    return np.array([0.03 if out else -0.02, 0.02 * np.sin(step), -0.02 if out else 0.03, 0.0, 0.05,
                     0.1 * (-1) ** step, 1.0 if step < 4 else -1.0])


@needs_simpler
@pytest.mark.parametrize("task", ["google_robot_pick_coke_can", "widowx_carrot_on_plate"])  # reused before #29
def test_an_episode_after_one_that_moved_the_arm_starts_and_goes_on_as_in_a_fresh_environment(task):
    from robovlms.benchmarks.simpler_episodes import episodes

    benchmark = simpler(task)
    first, second = (EpisodeSpec(task=task, scene=episode.scene, instruction=episode.instruction, seed=index)
                     for index, episode in enumerate(episodes(task, "visual_matching")[:2]))  # same build arguments
    after, fresh = benchmark.make_environment(), benchmark.make_environment()
    try:
        after.reset(first)
        for step in range(12):
            after.step(arm_motion(step), observe=False)
        observed = [after.reset(second)], [fresh.reset(second)]
        for step in range(3):
            for environment, frames in zip((after, fresh), observed):
                frames.append(environment.step(arm_motion(step), observe=True)[0])
        for frame_after, frame_fresh in zip(*observed):
            differing = int((frame_after.images["rgb_static"] != frame_fresh.images["rgb_static"]).any(-1).sum())
            assert differing == 0 and (frame_after.state == frame_fresh.state).all()
    finally:
        after.close()
        fresh.close()


@needs_simpler
def test_a_missing_collision_mesh_of_the_real_simulator_is_named(monkeypatch, tmp_path):
    benchmark = simpler("google_robot_pick_coke_can")
    environment = benchmark.make_environment()
    data = environment.asset_dir
    environment.close()
    collision_mesh = Path("custom") / "models" / "opened_coke_can" / "collision.obj"
    copy = tmp_path / "data"  # the checkout's assets, linked, less the coke can's collision mesh
    for path in sorted(data.rglob("*")):
        if path.is_file() and path != data / collision_mesh:
            (copy / path.relative_to(data)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(data)).symlink_to(path)
    monkeypatch.setenv("MS2_REAL2SIM_ASSET_DIR", str(copy))
    environment = benchmark.make_environment()
    try:
        missing = copy / collision_mesh
        with pytest.raises(MissingDependencyError, match=f"missing collision mesh\\(es\\): {missing}\n"):
            environment.reset(benchmark.evaluation_episodes("visual_matching", 1)[0])
    finally:
        environment.close()


@needs_simpler
def test_move_near_without_its_bottles_visual_mesh_is_refused():
    benchmark = simpler("google_robot_move_near")
    environment = benchmark.make_environment()
    try:
        with pytest.raises(MissingDependencyError, match="blue_plastic_bottle/textured"):
            for spec in benchmark.evaluation_episodes("visual_matching", 60):
                environment.reset(spec)
    finally:
        environment.close()


# ---- the doctor -----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (CALVIN_PYTHON and CALVIN_CONF and SIMPLER_PYTHON), reason="needs both simulators' variables")
def test_the_doctor_says_both_real_simulators_are_ready(monkeypatch):
    from typer.testing import CliRunner

    from robovlms.cli import app

    monkeypatch.setenv("COLUMNS", "400")
    result = CliRunner().invoke(app, ["doctor", "calvin", "simpler"])
    print(result.output)
    assert result.exit_code == 0, result.output
