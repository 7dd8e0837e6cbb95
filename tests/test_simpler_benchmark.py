"""The SimplerEnv adapter against a stand-in with simpler_env's interface: SimplerEnv's episode lists and how an
episode is built and reset, the action conversion of its reference policies, the episode loop (the environment's
instruction, the task's step limit, success judged at the last step), scoring per variant, missing assets, and what
happens without the real packages."""

import os
import signal
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from simpler_stand_in import CAMERA_FILL, Actor, Agent, Pose, StandInSimulator, get_image_from_maniskill2_obs_dict

from robovlms.benchmark import EpisodeRecord, EpisodeSpec
from robovlms.benchmarks.simpler import (BRIDGE_TOP_DOWN, EPISODE_SEED, SimplerActionConverter, SimplerBenchmark,
                                         SimplerEnvironment, euler_to_axis_angle, proprio_state)
from robovlms.simulators.simpler_scene import SimplerScene, robot_poses
from robovlms.benchmarks.simpler_episodes import TASKS, episodes, robot_init_quat
from robovlms.errors import ConfigError, MissingDependencyError, SimulatorDied, UnknownNameError


class Push:
    """Pushes `pushes[t]` metres along x at step t (0 after them), gripper open; remembers its resets."""

    def __init__(self, pushes=()):
        self.pushes, self.t, self.resets = list(pushes), 0, []

    def reset(self, spec):
        self.resets.append(spec)
        self.t = 0

    def step(self, observation):
        push = self.pushes[self.t] if self.t < len(self.pushes) else 0.0
        self.t += 1
        return np.array([push, 0, 0, 0, 0, 0, 1.0], dtype=np.float32)


def stand_in_environment(robot, simulator, image_size=64):
    scene = SimplerScene(simulator.build, get_image_from_maniskill2_obs_dict, str(simulator.asset_dir))
    return SimplerEnvironment(robot, image_size, scene, simulator.asset_dir)


def run(benchmark, spec, tmp_path, policy=None, simulator=None):
    simulator = simulator or StandInSimulator(tmp_path / "data")
    environment = stand_in_environment(benchmark.robot, simulator, benchmark.image_size)
    return benchmark.run_episode(environment, spec, policy or Push()), simulator, environment


def spec_of(task, protocol, index):
    episode = episodes(task, protocol)[index]
    return EpisodeSpec(task=task, scene=episode.scene, instruction=episode.instruction, seed=index)


@pytest.fixture
def google():
    return SimplerBenchmark(robot="google_robot", image_size=64)


@pytest.fixture
def widowx():
    return SimplerBenchmark(robot="widowx", image_size=64)


# ---- action conversion --------------------------------------------------------------------------------------------

def test_translation_passes_through_and_euler_deltas_become_axis_angle():
    action = SimplerActionConverter("widowx")(np.array([0.01, -0.02, 0.03, 0.0, 0.0, np.pi / 2, 1.0]))
    np.testing.assert_allclose(action[:6], [0.01, -0.02, 0.03, 0.0, 0.0, np.pi / 2], atol=1e-12)


def test_a_roll_pitch_yaw_triple_becomes_the_rotation_vector_of_static_xyz_euler_angles():
    expected = Rotation.from_euler("xyz", [0.1, -0.2, 0.3]).as_rotvec()  # transforms3d's 'sxyz'
    np.testing.assert_allclose(euler_to_axis_angle(0.1, -0.2, 0.3), expected, atol=1e-12)
    np.testing.assert_array_equal(euler_to_axis_angle(0.0, 0.0, 0.0), [0.0, 0.0, 0.0])


def test_widowx_gripper_is_binarised_open_above_the_middle():
    convert = SimplerActionConverter("widowx")
    grippers = [convert(np.array([0, 0, 0, 0, 0, 0, g]))[6] for g in (1.0, 0.3, 0.0, -0.2, -1.0)]
    assert grippers == [1.0, 1.0, -1.0, -1.0, -1.0]


def test_google_robot_gripper_close_is_repeated_for_15_steps_then_released():
    convert = SimplerActionConverter("google_robot")
    raw = [1.0] * 2 + [-1.0] * 20 + [1.0] * 17  # open, close, open again
    grippers = [convert(np.array([0, 0, 0, 0, 0, 0, g]))[6] for g in raw]
    assert grippers[:2] == [0.0, 0.0]  # the first step has no previous action: no change
    assert grippers[2:17] == [1.0] * 15 and grippers[17:22] == [0.0] * 5  # +1 closes the Google robot's gripper
    assert grippers[22:37] == [-1.0] * 15 and grippers[37:] == [0.0] * 2


def test_the_converter_forgets_the_previous_episode_at_reset():
    convert = SimplerActionConverter("google_robot")
    for g in (1.0, -1.0):
        convert(np.array([0, 0, 0, 0, 0, 0, g]))
    convert.reset()
    assert convert(np.array([0, 0, 0, 0, 0, 0, 1.0]))[6] == 0.0


# ---- episode lists ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task, protocol, count", [
    ("google_robot_pick_coke_can", "visual_matching", 300),  # 3 orientations x 4 URDFs x 5 x 5 can positions
    ("google_robot_pick_coke_can", "variant_aggregation", 675),  # 3 orientations x 9 variants x 25
    ("google_robot_move_near", "visual_matching", 240),  # 4 URDFs x 60
    ("google_robot_move_near", "variant_aggregation", 480),  # 8 variants x 60
    ("google_robot_open_drawer", "visual_matching", 108),  # 3 drawers x 4 URDFs x 9 placements
    ("google_robot_close_drawer", "variant_aggregation", 189),  # 3 drawers x 7 variants x 3 x 3 robot positions
    ("widowx_spoon_on_towel", "visual_matching", 24),
    ("widowx_carrot_on_plate", "visual_matching", 24),
    ("widowx_stack_cube", "visual_matching", 24),
    ("widowx_put_eggplant_in_basket", "visual_matching", 24),
])
def test_a_task_has_as_many_episodes_as_simpler_envs_scripts_run(task, protocol, count):
    assert len(episodes(task, protocol)) == count


def test_the_published_protocol_is_every_episode_seeded_by_its_index(widowx):
    specs = widowx.evaluation_episodes("visual_matching", 1000)
    assert len(specs) == 4 * 24
    assert [spec.seed for spec in specs if spec.task == "widowx_stack_cube"] == list(range(24))
    assert {spec.instruction for spec in specs if spec.task == "widowx_carrot_on_plate"} == {"put carrot on plate"}


def test_fewer_episodes_spread_over_every_variant_and_over_its_placements():
    specs = SimplerBenchmark("google_robot", ["google_robot_pick_coke_can"]).evaluation_episodes("visual_matching", 24)
    assert len({spec.scene for spec in specs}) == 12 and len(specs) == 24
    listed = episodes("google_robot_pick_coke_can", "visual_matching")
    for scene in {spec.scene for spec in specs}:
        placements = [listed[spec.seed].obj_init_xy for spec in specs if spec.scene == scene]
        assert len(set(placements)) == 2
    again = SimplerBenchmark("google_robot", ["google_robot_pick_coke_can"]).evaluation_episodes("visual_matching", 24)
    assert again == specs


def test_an_episode_is_built_and_reset_as_simpler_envs_evaluator_does(google, tmp_path):
    _, simulator, _ = run(google, spec_of("google_robot_pick_coke_can", "visual_matching", 1), tmp_path)
    env = simulator.built[0]
    assert env.env_name == "GraspSingleOpenedCokeCanInScene-v0"
    assert env.build_kwargs == {
        "lr_switch": True, "urdf_version": None, "obs_mode": "rgbd", "robot": "google_robot_static",
        "sim_freq": 513, "control_freq": 3, "max_episode_steps": 80, "scene_name": "google_pick_coke_can_1_v4",
        "control_mode": "arm_pd_ee_delta_pose_align_interpolate_by_planner_gripper_pd_joint_target_delta_pos"
                        "_interpolate_by_planner", "camera_cfgs": {"add_segmentation": True},
        "rgb_overlay_path": str(tmp_path / "data" / "real_inpainting" / "google_coke_can_real_eval_1.png")}
    reset = env.resets[0]
    assert reset["seed"] == EPISODE_SEED == 40194941
    np.testing.assert_allclose(reset["options"]["robot_init_options"]["init_xy"], [0.35, 0.20])
    np.testing.assert_allclose(reset["options"]["robot_init_options"]["init_rot_quat"], [0, 0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(reset["options"]["obj_init_options"]["init_xy"], [-0.35, 0.09])


def test_widowx_episodes_run_at_5_hz_from_their_episode_ids(widowx, tmp_path):
    _, simulator, _ = run(widowx, spec_of("widowx_put_eggplant_in_basket", "visual_matching", 7), tmp_path)
    env = simulator.built[0]
    assert (env.build_kwargs["control_freq"], env.build_kwargs["sim_freq"]) == (5, 500)
    assert (env.build_kwargs["robot"], env.build_kwargs["scene_name"]) == ("widowx_sink_camera_setup",
                                                                           "bridge_table_1_v2")
    assert env.build_kwargs["rgb_overlay_path"].endswith("real_inpainting/bridge_sink.png")
    assert env.resets[0]["options"]["obj_init_options"] == {"episode_id": 7}
    np.testing.assert_allclose(env.resets[0]["options"]["robot_init_options"]["init_xy"], [0.127, 0.06])


def test_a_robot_yaw_turns_the_scripts_centre_orientation():
    yaw = -0.09
    w1, z1 = np.cos(yaw / 2), np.sin(yaw / 2)  # euler2quat(0, 0, yaw), times (w, x, y, z) = (0, 0, 0, 1)
    hamilton = [w1 * 0 - z1 * 1, 0.0, 0.0, w1 * 1 + z1 * 0]
    np.testing.assert_allclose(robot_init_quat(yaw), hamilton, atol=1e-15)


# ---- the episode loop -----------------------------------------------------------------------------------------------

def test_the_policy_and_the_record_get_the_environments_instruction(google, tmp_path):
    policy = Push()
    record, _, _ = run(google, spec_of("google_robot_move_near", "visual_matching", 5), tmp_path, policy)
    assert policy.resets[0].instruction == record.instruction == "move object 5 near the other"


@pytest.mark.parametrize("robot, task, protocol, steps", [
    ("google_robot", "google_robot_pick_coke_can", "variant_aggregation", 80),
    ("google_robot", "google_robot_close_drawer", "visual_matching", 113),
    ("widowx", "widowx_spoon_on_towel", "visual_matching", 60),
    ("widowx", "widowx_put_eggplant_in_basket", "visual_matching", 120),
])
def test_an_episode_runs_its_tasks_step_limit(robot, task, protocol, steps, tmp_path):
    benchmark = SimplerBenchmark(robot, image_size=64)
    record, simulator, _ = run(benchmark, spec_of(task, protocol, 0), tmp_path)
    assert record.steps == len(simulator.built[0].actions) == steps and not record.success
    assert benchmark.max_steps == (113 if robot == "google_robot" else 120)


def test_success_is_judged_at_the_last_step_not_when_first_reached(google, tmp_path):
    spec = spec_of("google_robot_pick_coke_can", "visual_matching", 0)
    kept, _, _ = run(google, spec, tmp_path, Push([0.02] * 3))  # solved after 3 steps, and still at the end
    undone, _, _ = run(google, spec, tmp_path, Push([0.02] * 3 + [-0.02] * 3))  # solved, then undone
    assert kept.success and kept.steps == 80
    assert not undone.success and undone.steps == 80


def test_observations_are_the_robots_default_camera_resized_square_and_its_8d_state(tmp_path):
    simulator = StandInSimulator(tmp_path / "data")
    environment = stand_in_environment("widowx", simulator)
    observation = environment.reset(spec_of("widowx_stack_cube", "visual_matching", 0))
    image = observation.images["rgb_static"]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and (image == CAMERA_FILL["3rd_view_camera"]).all()
    assert observation.state.shape == (8,) and observation.state.dtype == np.float32


def test_an_episode_after_one_that_moved_the_arm_starts_as_in_a_fresh_environment(google, tmp_path):
    environment = stand_in_environment("google_robot", StandInSimulator(tmp_path / "data"))
    google.run_episode(environment, spec_of("google_robot_pick_coke_can", "visual_matching", 0), Push([0.01] * 12))
    after = environment.reset(spec_of("google_robot_pick_coke_can", "visual_matching", 1)).images["rgb_static"]
    fresh = stand_in_environment("google_robot", StandInSimulator(tmp_path / "fresh"))
    assert (after == fresh.reset(spec_of("google_robot_pick_coke_can", "visual_matching", 1)).images["rgb_static"]
            ).all()


def test_a_policy_of_another_action_dimension_is_refused(google, tmp_path):
    class EightD(Push):
        def step(self, observation):
            return np.zeros(8, dtype=np.float32)

    with pytest.raises(ValueError, match="dimension 8"):
        run(google, spec_of("google_robot_open_drawer", "visual_matching", 0), tmp_path, EightD())


def test_the_state_is_the_tool_pose_in_the_robot_base_frame():
    agent = Agent()  # its base is half a turn about z
    base = agent.robot.pose
    base_rotation = Rotation.from_quat(np.roll(base.q, -1))
    top_down = base_rotation * Rotation.from_matrix(BRIDGE_TOP_DOWN)
    tool = Actor("tcp", Pose(base.p + base_rotation.apply([0.1, 0.0, 0.2]), np.roll(top_down.as_quat(), 1)))
    agent.closedness = 0.25
    sim = SimpleNamespace(agent=agent, tcp=tool)  # the tool 10 cm ahead of the base, 20 cm up, pointing down
    fractal, bridge = proprio_state(robot_poses(sim), "google_robot"), proprio_state(robot_poses(sim), "widowx")
    np.testing.assert_allclose(fractal[:3], [0.1, 0.0, 0.2], atol=1e-6)
    np.testing.assert_allclose(np.abs(fractal[3:7]), np.abs(Rotation.from_matrix(BRIDGE_TOP_DOWN).as_quat()), atol=1e-6)
    assert fractal[7] == 0.25  # closedness
    np.testing.assert_allclose(bridge, [0.1, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.75], atol=1e-6)  # top-down: rpy 0


# ---- scoring --------------------------------------------------------------------------------------------------------

def record(task, scene, success, grasped=None):
    extra = {"episode_stats": {} if grasped is None else {"is_src_obj_grasped": grasped}}
    return EpisodeRecord(task, scene, "", 0, success, 80, 0.0, extra=extra)


def test_a_task_scores_the_mean_over_its_variants_and_success_the_mean_over_tasks(google):
    records = ([record("google_robot_move_near", "variant_aggregation:base", True)]
               + [record("google_robot_move_near", "variant_aggregation:alt_background", False)] * 3
               + [record("google_robot_open_drawer", "variant_aggregation:top+base", True)] * 2)
    scores = google.score(records)
    assert scores["success/google_robot_move_near"] == pytest.approx(0.5)  # not 1/4: variants weigh equally
    assert scores["success/google_robot_open_drawer"] == 1.0
    assert scores["success"] == pytest.approx(0.75)
    assert "grasp/google_robot_move_near" not in scores


def test_widowx_tasks_also_score_the_grasp_partial_success(widowx):
    records = [record("widowx_carrot_on_plate", "visual_matching:bridge_table_1_v1", False, grasped)
               for grasped in (True, True, False, False)]
    assert widowx.score(records)["grasp/widowx_carrot_on_plate"] == 0.5


# ---- errors -------------------------------------------------------------------------------------------------------

def test_widowx_has_no_variant_aggregation(widowx):
    assert widowx.splits() == ["visual_matching"]
    with pytest.raises(ConfigError, match="visual_matching only"):
        widowx.evaluation_episodes("variant_aggregation", 10)


def test_an_unknown_protocol_lists_the_valid_ones(google):
    with pytest.raises(UnknownNameError, match="valid choices: variant_aggregation, visual_matching"):
        google.evaluation_episodes("ABC->D", 10)


def test_an_unknown_task_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="widowx_stack_cube"):
        SimplerBenchmark("widowx", ["widowx_fold_towel"])


def test_a_task_of_the_other_robot_is_refused():
    with pytest.raises(ConfigError, match="google_robot_move_near is a google_robot task"):
        SimplerBenchmark("widowx", ["widowx_stack_cube", "google_robot_move_near"])


def test_options_rebuild_the_same_benchmark(google):
    rebuilt = SimplerBenchmark(**google.options())
    assert rebuilt.options() == google.options() and rebuilt.tasks() == google.tasks()


def test_a_missing_stage_mesh_is_named(google, tmp_path):
    data = tmp_path / "data"
    stage = "hab2_bench_assets/stages/google_pick_coke_can_1_v4.glb"
    with pytest.raises(MissingDependencyError, match=f"Missing: {data / stage}. Point MS2_ASSET_DIR"):
        run(google, spec_of("google_robot_pick_coke_can", "visual_matching", 0), tmp_path,
            simulator=StandInSimulator(data, table_missing=True, missing=(stage,)))


def test_a_missing_visual_mesh_is_named_though_nothing_fell(google, tmp_path):
    data = tmp_path / "data"
    model = data / "custom" / "models" / "eggplant"
    with pytest.raises(MissingDependencyError, match="incomplete") as error:
        run(google, spec_of("google_robot_move_near", "visual_matching", 0), tmp_path,
            simulator=StandInSimulator(data, missing=("custom/models/eggplant/textured.dae",)))
    assert f"Missing: {model / 'textured.obj'} or {model / 'textured.dae'} or {model / 'textured.glb'}." in str(
        error.value)


def test_a_missing_overlay_is_named(widowx, tmp_path):
    data = tmp_path / "data"
    with pytest.raises(MissingDependencyError, match="real_inpainting/bridge_real_eval_1.png"):
        run(widowx, spec_of("widowx_carrot_on_plate", "visual_matching", 0), tmp_path,
            simulator=StandInSimulator(data, missing=("real_inpainting/bridge_real_eval_1.png",)))


def test_a_missing_collision_mesh_is_named(google, tmp_path):
    data = tmp_path / "data"
    collision = data / "custom" / "models" / "opened_coke_can" / "collision.obj"
    with pytest.raises(MissingDependencyError, match=f"missing collision mesh\\(es\\): {collision}\n"):
        run(google, spec_of("google_robot_pick_coke_can", "visual_matching", 0), tmp_path,
            simulator=StandInSimulator(data, missing=("custom/models/opened_coke_can/collision.obj",)))


def test_a_renderer_without_a_vulkan_device_is_named_with_what_to_install(tmp_path):
    def no_vulkan_device(env_name, **kwargs):
        raise RuntimeError("Cannot find a suitable rendering device")

    environment = SimplerEnvironment("widowx", 64, SimplerScene(no_vulkan_device, get_image_from_maniskill2_obs_dict),
                                     tmp_path)
    with pytest.raises(MissingDependencyError, match="SAPIEN found no Vulkan device .* bookworm-backports"):
        environment.reset(spec_of("widowx_carrot_on_plate", "visual_matching", 0))


def test_objects_fallen_through_the_table_with_every_asset_present_may_be_damaged(google, tmp_path):
    with pytest.raises(MissingDependencyError, match="fell through the table .* may be damaged"):
        run(google, spec_of("google_robot_pick_coke_can", "visual_matching", 0), tmp_path,
            simulator=StandInSimulator(tmp_path / "data", table_missing=True))


def test_without_simpler_env_the_error_says_what_to_install(google, monkeypatch):
    for module in ("simpler_env", "mani_skill2_real2sim"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError,
                       match="git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules") as error:
        google.check_available()
    assert "pip install -e SimplerEnv/ManiSkill2_real2sim" in str(error.value) and "Vulkan" in str(error.value)
    assert "ROBOVLMS_SIMPLER_PYTHON" in str(error.value)


def test_the_install_lines_pin_what_docs_simpler_md_pins():
    from pathlib import Path

    from robovlms.benchmarks.simpler import INSTALL

    docs = (Path(__file__).parents[1] / "docs" / "simpler.md").read_text().replace("\\\n", " ")
    pins = next(line for line in docs.splitlines() if "simpler-venv/bin/pip install 'numpy<2'" in line).split()[2:]
    assert "sapien==2.2.2" in pins and [pin for pin in pins if pin not in INSTALL] == []


def test_a_missing_vulkan_loader_is_named_with_what_to_install(monkeypatch):
    from robovlms.benchmarks import simpler
    from robovlms.simulators import simpler_scene

    def without_vulkan_loader():
        raise ImportError("libvulkan.so.1: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(simpler.SimplerBenchmark, "check_available", lambda self: None)
    monkeypatch.setattr(simpler_scene, "open_simpler", without_vulkan_loader)
    with pytest.raises(MissingDependencyError, match="SAPIEN cannot load the Vulkan loader .* libvulkan1"):
        SimplerBenchmark(robot="widowx").make_environment()


# ---- robot and tasks, environment reuse, a simulator in its own environment -----------------------------------

def test_one_task_given_as_a_string_is_that_task():
    assert SimplerBenchmark(tasks="widowx_stack_cube").tasks() == ["widowx_stack_cube"]


def test_the_robot_is_the_one_whose_tasks_are_given():
    assert SimplerBenchmark(tasks=["google_robot_move_near"]).robot == "google_robot"
    assert SimplerBenchmark(tasks="google_robot_pick_coke_can").robot == "google_robot"
    assert SimplerBenchmark().robot == "widowx"


def test_tasks_of_both_robots_are_refused():
    with pytest.raises(ConfigError, match="two robots"):
        SimplerBenchmark(tasks=["widowx_stack_cube", "google_robot_move_near"])


def test_evaluate_takes_one_google_robot_task_without_a_store(monkeypatch):
    from typer.testing import CliRunner

    from robovlms.cli import app

    for module in ("simpler_env", "mani_skill2_real2sim"):
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delenv("ROBOVLMS_SIMPLER_PYTHON", raising=False)
    result = CliRunner().invoke(app, ["evaluate", "--benchmark", "simpler", "--tasks", "google_robot_pick_coke_can",
                                      "--benchmark-split", "variant_aggregation", "--policy", "zero"])
    assert isinstance(result.exception, MissingDependencyError)  # it got as far as looking for SimplerEnv


@pytest.mark.parametrize("task", ["google_robot_pick_coke_can", "google_robot_move_near", "widowx_carrot_on_plate"])
def test_each_episode_gets_a_freshly_built_environment(task, tmp_path):
    simulator = StandInSimulator(tmp_path / "data")
    environment = stand_in_environment(TASKS[task], simulator)
    first, second = episodes(task, "visual_matching")[:2]
    assert first.build_kwargs(tmp_path) == second.build_kwargs(tmp_path)
    for index in (0, 1):
        environment.reset(spec_of(task, "visual_matching", index))
    assert len(simulator.built) == 2 and simulator.built[0].closed and len(simulator.built[1].resets) == 1


def test_an_episode_runs_the_same_with_the_simulator_in_another_interpreter(google, tmp_path):
    from simpler_stand_in import __file__ as stand_in_file

    from robovlms.benchmarks.remote import SimulatorProcess
    from robovlms.benchmarks.simpler import SCENE_MODULE

    process = SimulatorProcess(sys.executable)
    scene = process.call(stand_in_file, "stand_in_scene", SCENE_MODULE, str(tmp_path / "remote"))
    environment = SimplerEnvironment("google_robot", 64, scene, tmp_path / "remote", process)
    spec = spec_of("google_robot_pick_coke_can", "visual_matching", 3)
    remote = google.run_episode(environment, spec, Push([0.02] * 3))
    environment.close()
    local, _, _ = run(google, spec, tmp_path, Push([0.02] * 3))
    assert (remote.success, remote.steps, remote.instruction, remote.extra) == (
        local.success, local.steps, local.instruction, local.extra)
    assert remote.success


def test_closing_an_environment_whose_simulator_died_raises_nothing_more(tmp_path):
    from simpler_stand_in import __file__ as stand_in_file

    from robovlms.benchmarks.remote import SimulatorProcess
    from robovlms.benchmarks.simpler import SCENE_MODULE

    process = SimulatorProcess(sys.executable)
    scene = process.call(stand_in_file, "stand_in_scene", SCENE_MODULE, str(tmp_path / "remote"))
    environment = SimplerEnvironment("google_robot", 64, scene, tmp_path / "remote", process)
    environment.reset(spec_of("google_robot_pick_coke_can", "visual_matching", 0))
    os.kill(process.pid, signal.SIGKILL)
    with pytest.raises(SimulatorDied, match=r"killed by SIGKILL .* during step\(\)"):
        environment.step(np.zeros(7), observe=True)
    environment.close()
    assert process.log_path.exists()  # named by the error
    process.log_path.unlink()


def test_a_python_option_names_the_interpreter_that_runs_simpler_env(monkeypatch):
    monkeypatch.setenv("ROBOVLMS_SIMPLER_PYTHON", "/opt/simpler/bin/python")
    assert SimplerBenchmark().python == "/opt/simpler/bin/python"
    assert SimplerBenchmark(python="/elsewhere/python").python == "/elsewhere/python"
    # where it runs is not what it is: stores and evaluation shards stay comparable across machines
    assert "python" not in SimplerBenchmark(python="/elsewhere/python").options()


def test_an_interpreter_without_simpler_env_says_what_to_install_there():
    with pytest.raises(MissingDependencyError, match=f"{sys.executable} .* cannot import simpler_env"):
        SimplerBenchmark(python=sys.executable).check_available()


def test_simpler_has_no_validation_episodes_and_says_what_to_choose_on_instead(google):
    """Every episode SimplerEnv defines is part of its published evaluation."""
    with pytest.raises(ConfigError, match="no validation episodes.*published evaluation.*val_loss"):
        google.split_episodes("visual_matching", "validation", 1)
    assert google.split_episodes("visual_matching", "test", 2) == google.evaluation_episodes("visual_matching", 2)
