"""The CALVIN and SimplerEnv adapters against the real simulators, each in its own Python environment (opt-in:
`pytest -m real_simulators`; docs/calvin.md and docs/simpler.md say how to install them).

ROBOVLMS_CALVIN_PYTHON names the interpreter of CALVIN's environment and ROBOVLMS_CALVIN_CONF the calvin
repository's calvin_models/conf folder; ROBOVLMS_SIMPLER_PYTHON the interpreter of SimplerEnv's (a wrapper script
may set VK_ICD_FILENAMES and LD_PRELOAD first). Tests of a simulator whose variables are unset are skipped. Each test
prints the simulator's steps per second.
"""

import os
import time

import numpy as np
import pytest

from robovlms.errors import MissingDependencyError

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


@needs_simpler
def test_a_reused_pick_coke_can_environment_renders_what_a_fresh_one_renders():
    benchmark = simpler("google_robot_pick_coke_can")
    spec = benchmark.evaluation_episodes("visual_matching", 1)[0]
    reused = benchmark.make_environment()
    fresh = benchmark.make_environment()
    try:
        reused.reset(spec)
        reused.step(np.array([0.02, 0, 0, 0, 0, 0, -1.0]), observe=False)
        again = reused.reset(spec).images["rgb_static"]
        assert (again == fresh.reset(spec).images["rgb_static"]).all()
    finally:
        reused.close()
        fresh.close()


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
