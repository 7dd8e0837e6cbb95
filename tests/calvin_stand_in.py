"""A stand-in for calvin_env: its play table's interface and its task oracle, reduced to an arm moving along x.

Imports only numpy, so a simulator server can load it in an interpreter without robovlms (test_simulator_process).
"""

import os
import signal

import numpy as np

IMPOSSIBLE = "turn_off_lightbulb"


class StandInPlayTable:
    """`calvin_env`'s PlayTableSimEnv interface: reset(robot_obs, scene_obs), step(7-D relative action) ->
    (obs, reward, done, info), get_obs(), get_info(), close(). The arm moves along x by the action's first
    dimension; like calvin_env's, closing twice fails."""

    def __init__(self):
        self.x = 0.0
        self.gripper = 1
        self.resets, self.actions = [], []
        self.connected = True

    def reset(self, robot_obs=None, scene_obs=None):
        self.resets.append((np.array(robot_obs), np.array(scene_obs)))
        self.x, self.gripper = 0.0, int(robot_obs[14])
        return self.get_obs()

    def step(self, action):
        assert self.connected, "Not connected to physics server"
        assert len(action) == 7 and action[6] in (-1, 1)  # calvin_env asserts the gripper is exactly -1 or 1
        self.actions.append(np.array(action))
        self.x += 0.02 * action[0]  # rel_actions are in units of 2 cm
        self.gripper = int(action[6])
        return self.get_obs(), 0, False, self.get_info()

    def get_obs(self):
        robot_obs = np.full(15, self.x)
        robot_obs[14] = self.gripper
        return {"rgb_obs": {"rgb_static": np.full((200, 200, 3), 100, np.uint8),
                            "rgb_gripper": np.full((84, 84, 3), 50, np.int64)},  # pybullet may give ints
                "depth_obs": {}, "robot_obs": robot_obs, "scene_obs": np.zeros(24)}

    def get_info(self):
        return {"robot_info": {"tcp_pos": (self.x, 0, 0)}, "scene_info": {"contacts": ((1, 2), (3, 4))}}

    def close(self):
        if not self.connected:
            raise RuntimeError("Not connected to physics server")
        self.connected = False


class StandInOracle:
    """`calvin_env.envs.tasks.Tasks.get_task_info_for_set`: a subtask is solved once the arm moved 2 cm."""

    def get_task_info_for_set(self, start_info, end_info, task_filter):
        moved = end_info["robot_info"]["tcp_pos"][0] - start_info["robot_info"]["tcp_pos"][0]
        return {task for task in task_filter if task != IMPOSSIBLE and moved >= 0.02 - 1e-9}


def exit_abruptly(code: int) -> None:
    """A simulator that dies in the middle of a call, as a segfaulting renderer does."""
    print("renderer: lost the device", flush=True)
    os._exit(code)


def say(text: str) -> None:
    """What a simulator prints in passing (start-up chatter, warnings)."""
    print(text, flush=True)


def kill_itself(last_words: str) -> None:
    """A simulator killed in the middle of a call, as the out-of-memory killer kills."""
    print(last_words, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
