"""Installations of the simulators' packages as a user may have them, written into a folder to put on PYTHONPATH for
an interpreter that then stands for the simulator's own environment: a calvin_env that fails to import, and a
simpler_env over the stand-in (tests/simpler_stand_in.py) that works, lacks a file, has no Vulkan device, or hangs.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
CALVIN_CONF_FILES = ("callbacks/rollout/tasks/new_playtable_tasks.yaml", "annotations/new_playtable_validation.yaml")


def write_package(folder: Path, name: str, code: str = "") -> None:
    """Package `name` (dotted: its parents too) whose module runs `code`."""
    parts = name.split(".")
    folder.joinpath(*parts).mkdir(parents=True, exist_ok=True)
    for depth in range(1, len(parts)):
        folder.joinpath(*parts[:depth], "__init__.py").touch()
    folder.joinpath(*parts, "__init__.py").write_text(textwrap.dedent(code))


def write_calvin_env_failing_to_import(folder: Path, missing: str) -> None:
    """calvin_env, hydra and pybullet found, calvin_env importing a module that is not installed (as calvin_env
    1431a46, which a recursive clone of calvin checks out, imports rich)."""
    write_package(folder, "calvin_env", f"import {missing}\n")
    write_package(folder, "hydra")
    write_package(folder, "pybullet")


def write_calvin_conf(folder: Path) -> Path:
    """A calvin_models/conf folder with the files robovlms looks for (empty)."""
    for name in CALVIN_CONF_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}\n")
    return folder


def write_simpler_env(folder: Path, build: str = "stand_in", **stand_in_options) -> None:
    """simpler_env, mani_skill2_real2sim and sapien, whose build_maniskill2_env builds the stand-in with
    `stand_in_options` ("stand_in"), fails for want of a Vulkan device as SAPIEN does ("no_vulkan"), or never
    returns ("hangs"). Their assets live in folder/data, as ManiSkill2_real2sim's in its checkout."""
    builds = {
        "stand_in": f"""
            import mani_skill2_real2sim
            from simpler_stand_in import StandInSimulator

            simulator = StandInSimulator(mani_skill2_real2sim.ASSET_DIR, **{stand_in_options!r})
            build_maniskill2_env = simulator.build
            """,
        "no_vulkan": """
            def build_maniskill2_env(env_name, **kwargs):
                raise RuntimeError("Cannot find a suitable rendering device")
            """,
        "hangs": """
            import time

            def build_maniskill2_env(env_name, **kwargs):
                time.sleep(10**6)
            """,
    }
    write_package(folder, "mani_skill2_real2sim", """
        from pathlib import Path

        ASSET_DIR = Path(__file__).resolve().parents[1] / "data"
        """)
    write_package(folder, "sapien")
    write_package(folder, "simpler_env.utils.env.env_builder", f"import sys\nsys.path.append({str(TESTS_DIR)!r})\n"
                  + textwrap.dedent(builds[build]))
    write_package(folder, "simpler_env.utils.env.observation_utils",
                  f"import sys\nsys.path.append({str(TESTS_DIR)!r})\n"
                  "from simpler_stand_in import get_image_from_maniskill2_obs_dict\n")
    (folder / "data").mkdir(exist_ok=True)
