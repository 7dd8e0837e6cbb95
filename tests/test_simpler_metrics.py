import math

import pandas as pd
import pytest

from robovlms.benchmarks.simpler_metrics import PUBLISHED_SIM_SUCCESS, REAL_WORLD_SUCCESS, published_agreement
from robovlms.sim_to_real import (mean_maximum_rank_violation, pearson_correlation, read_real_world_success,
                                  sim_to_real_agreement)
from robovlms.errors import ConfigError, ReportError, UnknownNameError

GOOGLE_TASKS = ["google_robot_pick_coke_can", "google_robot_move_near", "google_robot_open_drawer",
                "google_robot_close_drawer", "google_robot_place_apple_in_closed_top_drawer"]
WIDOWX_TASKS = ["widowx_spoon_on_towel", "widowx_carrot_on_plate", "widowx_stack_cube",
                "widowx_put_eggplant_in_basket"]


def test_mmrv_is_the_mean_over_policies_of_the_largest_real_gap_to_a_misordered_policy():
    # real 0.9 > 0.6 but sim 0.5 < 0.7: policies 0 and 1 are misordered, each by the real gap 0.3; policy 2 (lowest
    # in both) is ordered right against both. MMRV = (0.3 + 0.3 + 0) / 3 = 0.2
    assert mean_maximum_rank_violation([0.9, 0.6, 0.1], [0.5, 0.7, 0.0]) == pytest.approx(0.2)


def test_mmrv_counts_a_tie_in_sim_as_a_violation_at_the_policy_better_in_real():
    # sim ties 0.5 = 0.5 while real 0.8 > 0.2: policy 0 has (sim 0 > sim 1) = False != (real 0 > real 1) = True,
    # a violation of |0.8 - 0.2| = 0.6; policy 1 has False == False. MMRV = (0.6 + 0) / 2 = 0.3
    assert mean_maximum_rank_violation([0.8, 0.2], [0.5, 0.5]) == pytest.approx(0.3)


def test_mmrv_of_a_tie_in_real_costs_nothing():
    # real ties 0.5 = 0.5: sim 0.9 > 0.1 is a violation for policy 0, weighted by the real gap 0
    assert mean_maximum_rank_violation([0.5, 0.5], [0.9, 0.1]) == 0.0


def test_mmrv_of_a_sim_that_orders_like_real_is_zero():
    assert mean_maximum_rank_violation([0.9, 0.4, 0.1], [0.3, 0.2, 0.0]) == 0.0


def test_mmrv_weights_violations_by_real_gaps_not_sim_gaps():
    # one misordered pair: real gap 0.1, sim gap 0.8; both policies take the real gap
    assert mean_maximum_rank_violation([0.5, 0.4], [0.1, 0.9]) == pytest.approx(0.1)


def test_pearson_matches_the_hand_computed_value():
    # centred real [-0.3, -0.1, 0.4], sim [-0.3, 0.1, 0.2]: r = 0.16 / sqrt(0.26 * 0.14) = 0.838628...
    assert pearson_correlation([0.2, 0.4, 0.9], [0.1, 0.5, 0.6]) == pytest.approx(0.16 / math.sqrt(0.26 * 0.14))


def test_pearson_of_rates_equal_up_to_a_shift_is_exactly_one():
    assert pearson_correlation([0.25, 0.5, 0.75], [0.0, 0.25, 0.5]) == 1.0


def test_pearson_of_two_constant_rate_lists_is_one_as_in_simplerenv():
    assert pearson_correlation([0.5, 0.5], [0.25, 0.25]) == 1.0


def test_pearson_of_a_constant_list_against_a_varying_one_is_zero():
    assert pearson_correlation([0.8, 0.2], [0.5, 0.5]) == 0.0


def test_pearson_keeps_simplerenvs_epsilon_so_a_perfect_rescaled_correlation_falls_short_of_one():
    # centred [-0.25, 0.25] and [-0.5, 0.5]: 0.25 / (0.25 + 1e-8)
    assert pearson_correlation([0.0, 0.5], [0.0, 1.0]) == pytest.approx(0.25 / (0.25 + 1e-8), abs=1e-15)
    assert pearson_correlation([0.0, 0.5], [0.0, 1.0]) < 1.0


@pytest.mark.parametrize("metric", [mean_maximum_rank_violation, pearson_correlation])
def test_metrics_refuse_lists_of_different_lengths(metric):
    with pytest.raises(ConfigError, match=r"one success rate per policy.*\(3,\) and \(2,\)"):
        metric([0.1, 0.2, 0.3], [0.1, 0.2])


@pytest.mark.parametrize("metric", [mean_maximum_rank_violation, pearson_correlation])
def test_metrics_refuse_fewer_than_two_policies(metric):
    with pytest.raises(ConfigError, match="at least 2, got 1"):
        metric([0.5], [0.4])


@pytest.mark.parametrize("bad", [1.2, -0.1, math.nan])
def test_metrics_refuse_rates_outside_the_unit_interval(bad):
    with pytest.raises(ConfigError, match=r"sim success rates must lie in \[0, 1\]"):
        mean_maximum_rank_violation([0.5, 0.4], [0.5, bad])


def test_agreement_has_a_row_per_task_with_two_policies_and_a_mean_row():
    sim = {"A": {"t1": 0.5, "t2": 0.5, "t3": 0.9}, "B": {"t1": 0.7}, "C": {"t1": 0.0, "t2": 0.5}}
    real = {"A": {"t1": 0.9, "t2": 0.8, "t3": 0.4}, "B": {"t1": 0.6}, "C": {"t1": 0.1, "t2": 0.2},
            "D": {"t1": 0.3}}  # D has no simulated rate; t3 has a single policy
    table = sim_to_real_agreement(sim, real).set_index("task")
    assert list(table.index) == ["t1", "t2", "mean"]
    assert table.policies.tolist() == [3, 2, 3]
    assert table.mmrv.tolist() == pytest.approx([0.2, 0.3, 0.25])  # the hand-computed cases above
    assert table.pearson.tolist() == pytest.approx([pearson_correlation([0.9, 0.6, 0.1], [0.5, 0.7, 0.0]), 0.0,
                                                    pearson_correlation([0.9, 0.6, 0.1], [0.5, 0.7, 0.0]) / 2])


def test_agreement_without_a_task_of_two_policies_is_an_empty_table():
    table = sim_to_real_agreement({"A": {"t1": 0.5}, "B": {"t2": 0.5}}, {"A": {"t1": 0.9}, "B": {"t2": 0.1}})
    assert table.empty and list(table.columns) == ["task", "policies", "mmrv", "pearson"]


def test_published_data_pairs_every_simulated_rate_with_a_real_one():
    for protocol, by_task in PUBLISHED_SIM_SUCCESS.items():
        for task, rates in by_task.items():
            assert set(rates) == set(REAL_WORLD_SUCCESS[task]), (protocol, task)


def test_published_visual_matching_agreement_reproduces_simplerenvs_calc_metrics():
    table = published_agreement("visual_matching").set_index("task")
    assert list(table.index) == [*GOOGLE_TASKS, *WIDOWX_TASKS, "mean"]
    assert table.policies[GOOGLE_TASKS].tolist() == [6] * 5 and table.policies[WIDOWX_TASKS].tolist() == [3] * 4
    # SimplerEnv's tools/calc_metrics.py on SIMPLER_PERF and REAL_PERF
    assert table.loc["google_robot_pick_coke_can", ["mmrv", "pearson"]].tolist() == pytest.approx([0.031333, 0.975434],
                                                                                                 abs=1e-6)
    assert table.loc["google_robot_close_drawer", ["mmrv", "pearson"]].tolist() == pytest.approx([0.123333, 0.771233],
                                                                                                abs=1e-6)
    assert table.loc["widowx_carrot_on_plate", ["mmrv", "pearson"]].tolist() == pytest.approx([0.111333, 0.571368],
                                                                                             abs=1e-6)


def test_published_variant_aggregation_covers_the_google_robot_only():
    table = published_agreement("variant_aggregation").set_index("task")
    assert list(table.index) == [*GOOGLE_TASKS, "mean"]
    assert table.loc["google_robot_pick_coke_can", ["mmrv", "pearson"]].tolist() == pytest.approx([0.084667, 0.959805],
                                                                                                 abs=1e-6)
    assert table.loc["google_robot_open_drawer", ["mmrv", "pearson"]].tolist() == pytest.approx([0.302833, 0.630016],
                                                                                               abs=1e-6)


def test_published_agreement_keeps_only_the_tasks_asked_for():
    table = published_agreement("visual_matching", ["widowx_spoon_on_towel", "widowx_stack_cube", "not_published"])
    assert table.task.tolist() == ["widowx_spoon_on_towel", "widowx_stack_cube", "mean"]
    assert table.policies.tolist() == [3, 3, 3]


def test_published_agreement_of_an_unknown_protocol_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="'ABC->D'.*valid choices: variant_aggregation, visual_matching"):
        published_agreement("ABC->D")


def test_real_world_rates_read_alike_from_yaml_and_csv(tmp_path):
    (tmp_path / "real.yaml").write_text("policy a:\n  t1: 0.5\n  t2: 0.25\npolicy b:\n  t1: 1\n")
    pd.DataFrame({"configuration": ["policy a", "policy b"], "t1": [0.5, 1.0], "t2": [0.25, None]}).to_csv(
        tmp_path / "real.csv", index=False)
    expected = {"policy a": {"t1": 0.5, "t2": 0.25}, "policy b": {"t1": 1.0}}
    assert read_real_world_success(tmp_path / "real.yaml") == expected
    assert read_real_world_success(tmp_path / "real.csv") == expected


@pytest.mark.parametrize("rate", ["1.5", "-0.2", "yes", "high"])
def test_real_world_rates_outside_the_unit_interval_are_refused(tmp_path, rate):
    (tmp_path / "real.yaml").write_text(f"policy a:\n  t1: {rate}\n")
    with pytest.raises(ReportError, match=r"'policy a' on 't1' must be a rate in \[0, 1\]"):
        read_real_world_success(tmp_path / "real.yaml")


def test_real_world_csv_without_a_configuration_column_is_refused(tmp_path):
    pd.DataFrame({"policy": ["a"], "t1": [0.5]}).to_csv(tmp_path / "real.csv", index=False)
    with pytest.raises(ReportError, match="needs a column `configuration`"):
        read_real_world_success(tmp_path / "real.csv")


def test_real_world_file_of_another_format_is_refused(tmp_path):
    with pytest.raises(ReportError, match=r"use \.yaml, \.yml or \.csv"):
        read_real_world_success(tmp_path / "real.json")


def test_the_simpler_benchmark_offers_its_published_agreement_as_a_reports_yardstick_and_others_offer_none():
    from robovlms.benchmarks.metaworld import MetaWorldBenchmark
    from robovlms.benchmarks.simpler import SimplerBenchmark

    published = SimplerBenchmark.published_agreement("visual_matching", ["widowx_carrot_on_plate", "not_published"])
    assert published.source == "SimplerEnv" and published.policies == ["RT-1-X", "Octo-Base", "Octo-Small"]
    assert published.table.task.tolist() == ["widowx_carrot_on_plate", "mean"]
    assert published.table.mmrv[0] == pytest.approx(0.1113, abs=1e-4)
    assert SimplerBenchmark.published_agreement("variant_aggregation", ["widowx_carrot_on_plate"]) is None
    assert MetaWorldBenchmark.published_agreement("ABC->D", ["door-open"]) is None
