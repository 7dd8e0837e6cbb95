"""SimplerEnv's published sim-to-real numbers: the real-world and simulated success of its reference policies (RT-1
checkpoints, RT-1-X, RT-2-X, Octo), and the agreement (MMRV, Pearson; robovlms.sim_to_real) they give, the
yardstick a report of a SimplerEnv run shows beside its own agreement.

Task names are SimplerEnv's environment names; protocols are the benchmark's splits, "visual_matching" and
"variant_aggregation" (Google robot only, as in SimplerEnv).
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from robovlms.errors import UnknownNameError
from robovlms.sim_to_real import by_policy, sim_to_real_agreement

# Real-world success per task and policy: REAL_PERF in simpler_env/utils/metrics.py of simpler-env/SimplerEnv
# (the Google robot pick coke can rate is the mean over its three can orientations, as there), policy keys renamed
# from SimplerEnv's ("rt-1-converged", "rt-1-15pct", "rt-1-begin", "rt-1-x", "rt-2-x", "octo-base", "octo-small")
# to the paper's names. Trials per policy behind each rate, as SimplerEnv's tools/calc_metrics_evaluation_videos.py
# counts them: 75 coke can (25 per orientation), 60 move near, 27 per drawer task and apple, 24 per WidowX task.
REAL_WORLD_SUCCESS: dict[str, dict[str, float]] = {
    "google_robot_pick_coke_can": {"RT-2-X": 0.907, "RT-1 (Converged)": 0.853, "RT-1 (15%)": 0.920,
                                   "RT-1-X": 0.760, "RT-1 (Begin)": 0.133, "Octo-Base": 0.293},
    "google_robot_move_near": {"RT-2-X": 0.733, "RT-1 (Converged)": 0.633, "RT-1 (15%)": 0.583, "RT-1-X": 0.450,
                               "RT-1 (Begin)": 0.017, "Octo-Base": 0.350},
    "google_robot_open_drawer": {"RT-2-X": 0.333, "RT-1 (Converged)": 0.815, "RT-1 (15%)": 0.704, "RT-1-X": 0.519,
                                 "RT-1 (Begin)": 0.000, "Octo-Base": 0.148},
    "google_robot_close_drawer": {"RT-2-X": 0.630, "RT-1 (Converged)": 0.926, "RT-1 (15%)": 0.889, "RT-1-X": 0.741,
                                  "RT-1 (Begin)": 0.000, "Octo-Base": 0.519},
    "google_robot_place_apple_in_closed_top_drawer": {"RT-2-X": 0.074, "RT-1 (Converged)": 0.185,
                                                      "RT-1 (15%)": 0.185, "RT-1-X": 0.407, "RT-1 (Begin)": 0.000,
                                                      "Octo-Base": 0.000},
    "widowx_spoon_on_towel": {"RT-1-X": 0.000, "Octo-Base": 0.333, "Octo-Small": 0.417},
    "widowx_carrot_on_plate": {"RT-1-X": 0.000, "Octo-Base": 0.250, "Octo-Small": 0.083},
    "widowx_stack_cube": {"RT-1-X": 0.000, "Octo-Base": 0.000, "Octo-Small": 0.125},
    "widowx_put_eggplant_in_basket": {"RT-1-X": 0.000, "Octo-Base": 0.250, "Octo-Small": 0.400},
}

# Simulated success per protocol, task and policy, as the paper publishes it. Open and close drawer are separate
# tasks, as in REAL_PERF (the paper's tables also show their average).
PUBLISHED_SIM_SUCCESS: dict[str, dict[str, dict[str, float]]] = {
    # SIMPLER_PERF in simpler_env/utils/metrics.py of simpler-env/SimplerEnv (the "matching" entries of REF below
    # agree to the digit).
    "visual_matching": {
        "google_robot_pick_coke_can": {"RT-2-X": 0.787, "RT-1 (Converged)": 0.857, "RT-1 (15%)": 0.710,
                                       "RT-1-X": 0.567, "RT-1 (Begin)": 0.027, "Octo-Base": 0.170},
        "google_robot_move_near": {"RT-2-X": 0.779, "RT-1 (Converged)": 0.442, "RT-1 (15%)": 0.354, "RT-1-X": 0.317,
                                   "RT-1 (Begin)": 0.050, "Octo-Base": 0.042},
        "google_robot_open_drawer": {"RT-2-X": 0.157, "RT-1 (Converged)": 0.601, "RT-1 (15%)": 0.463,
                                     "RT-1-X": 0.296, "RT-1 (Begin)": 0.000, "Octo-Base": 0.009},
        "google_robot_close_drawer": {"RT-2-X": 0.343, "RT-1 (Converged)": 0.861, "RT-1 (15%)": 0.667,
                                      "RT-1-X": 0.891, "RT-1 (Begin)": 0.278, "Octo-Base": 0.444},
        "google_robot_place_apple_in_closed_top_drawer": {"RT-2-X": 0.037, "RT-1 (Converged)": 0.065,
                                                          "RT-1 (15%)": 0.130, "RT-1-X": 0.213,
                                                          "RT-1 (Begin)": 0.000, "Octo-Base": 0.000},
        "widowx_spoon_on_towel": {"RT-1-X": 0.000, "Octo-Base": 0.125, "Octo-Small": 0.472},
        "widowx_carrot_on_plate": {"RT-1-X": 0.042, "Octo-Base": 0.083, "Octo-Small": 0.097},
        "widowx_stack_cube": {"RT-1-X": 0.000, "Octo-Base": 0.000, "Octo-Small": 0.042},
        "widowx_put_eggplant_in_basket": {"RT-1-X": 0.000, "Octo-Base": 0.431, "Octo-Small": 0.569},
    },
    # REF in simpler_env/utils/metrics.py of the SimplerEnv forks that carry the paper's table (e.g.
    # ayudhsaxena/SimplerEnv-SITCOM): coke_can/variant_avg, move_near/variant, drawer/variant/open and close,
    # apple_in_drawer/variant_avg. Octo-Base's move near and drawer rates are those of the note at the end of
    # SimplerEnv's tools/calc_metrics_evaluation_videos.py (its default-URDF row).
    "variant_aggregation": {
        "google_robot_pick_coke_can": {"RT-2-X": 0.823, "RT-1 (Converged)": 0.898, "RT-1 (15%)": 0.813,
                                       "RT-1-X": 0.490, "RT-1 (Begin)": 0.022, "Octo-Base": 0.006},
        "google_robot_move_near": {"RT-2-X": 0.792, "RT-1 (Converged)": 0.500, "RT-1 (15%)": 0.446, "RT-1-X": 0.323,
                                   "RT-1 (Begin)": 0.040, "Octo-Base": 0.031},
        "google_robot_open_drawer": {"RT-2-X": 0.333, "RT-1 (Converged)": 0.270, "RT-1 (15%)": 0.212,
                                     "RT-1-X": 0.069, "RT-1 (Begin)": 0.005, "Octo-Base": 0.000},
        "google_robot_close_drawer": {"RT-2-X": 0.372, "RT-1 (Converged)": 0.376, "RT-1 (15%)": 0.323,
                                      "RT-1-X": 0.519, "RT-1 (Begin)": 0.132, "Octo-Base": 0.021},
        "google_robot_place_apple_in_closed_top_drawer": {"RT-2-X": 0.206, "RT-1 (Converged)": 0.026,
                                                          "RT-1 (15%)": 0.021, "RT-1-X": 0.101,
                                                          "RT-1 (Begin)": 0.000, "Octo-Base": 0.000},
    },
}
PROTOCOLS = tuple(PUBLISHED_SIM_SUCCESS)


def published_agreement(protocol: str, tasks: Iterable[str] | None = None) -> pd.DataFrame:
    """The agreement SimplerEnv publishes for its reference policies under `protocol`: PUBLISHED_SIM_SUCCESS against
    REAL_WORLD_SUCCESS, as sim_to_real_agreement's table. `tasks` keeps only those tasks (the ones a run evaluated;
    tasks SimplerEnv did not publish for the protocol are left out); None: every published task."""
    if protocol not in PUBLISHED_SIM_SUCCESS:
        raise UnknownNameError("SimplerEnv protocol", protocol, PROTOCOLS)
    published = PUBLISHED_SIM_SUCCESS[protocol]
    tasks = list(published) if tasks is None else [task for task in tasks if task in published]
    return sim_to_real_agreement(by_policy(published, tasks), by_policy(REAL_WORLD_SUCCESS, tasks))
