"""The statistics behind "resolved" (robovlms/report/comparisons.py), calibrated by simulation.

Simulated families have the demo's shape: 19 trained configurations (4 backbones x 4 formulations, gpt-scratch's
continuous cell also at 10% and 25% of the data, film-convnet) with 1 or 3 seeds, 3 baselines, 120 evaluation
episodes a cell shared by every cell. Each episode has its own difficulty (success probability drawn from
Beta(2.2, 1.8), mean 0.55), and each trained cell may add a seed effect (normal, 3 points). The main effects are
19 comparisons (10 backbone pairs, 6 formulation pairs, 3 data fractions) and the baselines 19 x 3 = 57.
"""

import itertools

import numpy as np
import pytest

from robovlms.report.comparisons import (FAMILY_ERROR, MIN_PAIRED_EPISODES, ComparisonData, comparison_statistics,
                                         family_verdicts, holm)

FAMILIES = 1000  # simulated families per check: the family-wise rate's simulation error is about 0.7 points
EPISODES = 120
SEED_SD = 0.03
BACKBONES = FORMULATIONS = 4
CONFIGURATIONS = 19
FRACTION_10, FRACTION_25, FILM = 16, 17, 18
GPT_CONTINUOUS = 3 * FORMULATIONS  # backbone 3 (gpt-scratch), formulation 0 (one-step-continuous)


def cell(backbone, formulation):
    return backbone * FORMULATIONS + formulation


def simulate(seeds, seed_sd, shift=None, families=FAMILIES, seed=0):
    """Outcomes of trained cells (families, 19, seeds, 120) and baselines (families, 3, 120); `shift` adds a true
    difference to some configurations."""
    rng = np.random.default_rng(seed)
    difficulty = rng.beta(2.2, 1.8, (families, 1, 1, EPISODES))
    success = difficulty + rng.normal(0, seed_sd, (families, CONFIGURATIONS, seeds, 1))
    if shift is not None:
        success = success + np.asarray(shift)[None, :, None, None]
    trained = rng.random((families, CONFIGURATIONS, seeds, EPISODES)) < np.clip(success, 0, 1)
    baselines = rng.random((families, 3, EPISODES)) < difficulty[:, 0]
    return trained.astype(float), baselines.astype(float)


def matched(trained, couples):
    """Per-episode differences of matched cells, seed by seed, and their cells."""
    seeds = trained.shape[2]
    differences = np.concatenate([trained[:, a] - trained[:, b] for a, b in couples], axis=1)
    return ComparisonData(paired=differences, episodes=EPISODES,
                          cells=[((a, seed), (b, seed)) for a, b in couples for seed in range(seeds)])


def main_effects(trained):
    comparisons = [matched(trained, [(cell(a, f), cell(b, f)) for f in range(FORMULATIONS)])
                   for a, b in itertools.combinations(range(BACKBONES), 2)]
    comparisons += [matched(trained, [(FILM, cell(b, 0))]) for b in range(BACKBONES)]
    comparisons += [matched(trained, [(cell(b, f), cell(b, g)) for b in range(BACKBONES)])
                    for f, g in itertools.combinations(range(FORMULATIONS), 2)]
    comparisons += [matched(trained, [(a, b)]) for a, b in itertools.combinations(
        (FRACTION_10, FRACTION_25, GPT_CONTINUOUS), 2)]
    return family_verdicts([comparison_statistics(comparison) for comparison in comparisons])


def against_baselines(trained, baselines):
    seeds = trained.shape[2]
    comparisons = [ComparisonData(paired=trained[:, c] - baselines[:, b, None], episodes=EPISODES,
                                  cells=[((c, seed), ("baseline", b)) for seed in range(seeds)])
                   for c in range(CONFIGURATIONS) for b in range(3)]
    return family_verdicts([comparison_statistics(comparison) for comparison in comparisons])


def family_wise_bound(rate=FAMILY_ERROR, families=FAMILIES):
    """The nominal rate plus two simulation standard errors."""
    return rate + 2 * np.sqrt(rate * (1 - rate) / families)


# ---- calibration: identical policies -------------------------------------------------------------------------


@pytest.mark.parametrize("seeds, seed_sd", [(1, 0.0), (3, 0.0), (3, SEED_SD)])
def test_identical_policies_are_called_different_at_most_5_percent_of_the_time_per_family(seeds, seed_sd):
    trained, baselines = simulate(seeds, seed_sd)
    for family in (main_effects(trained), against_baselines(trained, baselines)):
        assert family.resolved.any(axis=1).mean() <= family_wise_bound()
        assert 0.03 < (family.p_value < 0.05).mean() < 0.07  # each comparison alone stays near its 5%


def test_one_seed_main_effects_include_seed_variation_through_the_other_axes():
    """With one seed per cell the backbone and formulation comparisons still see seed noise: it makes the 4 x 4
    table's cells disagree (about 9 effective degrees of freedom, not the 36 that counting pairs would give)."""
    trained, _ = simulate(1, SEED_SD)
    family = main_effects(trained)
    assert family.resolved.any(axis=1).mean() <= family_wise_bound()
    assert 8 < family.between_pairs_df < 10


def test_one_seed_against_the_baselines_covers_episode_noise_only_and_says_so():
    """One seed per configuration and one baseline cell leave nothing to estimate seed noise from: the family
    reports 0 degrees of freedom for it (the report then says its intervals cover episode noise only), and with
    3-point seed noise it calls identical configurations different far more often than 5%."""
    trained, baselines = simulate(1, SEED_SD)
    family = against_baselines(trained, baselines)
    assert family.between_pairs_df == 0 and (family.between_pairs_variance == 0).all()
    assert family.resolved.any(axis=1).mean() > 2 * FAMILY_ERROR


def test_without_a_family_correction_identical_policies_would_be_called_different_often():
    """What the Holm adjustment guards against: a demo-shaped family tested comparison by comparison."""
    trained, baselines = simulate(1, 0.0)
    assert (main_effects(trained).p_value < 0.05).any(axis=1).mean() > 0.25
    assert (against_baselines(trained, baselines).p_value < 0.05).any(axis=1).mean() > 0.5


def test_standard_errors_match_the_spread_of_differences_over_replications():
    """With three seeds and seed noise, the standard error neither counts episode noise twice (as resampling pairs
    and then episodes within them does) nor leaves seed noise out."""
    trained, baselines = simulate(3, SEED_SD)
    for family in (main_effects(trained), against_baselines(trained, baselines)):
        ratio = family.standard_error.mean(axis=0) / family.difference.std(axis=0)
        assert np.all((ratio > 0.9) & (ratio < 1.1)), ratio


# ---- power: a true 15-point difference -------------------------------------------------------------------------


POWER = {  # (seeds, seed sd) -> stated power of one comparison with a true 15-point difference, the rest identical
    # (measured over 4000 families; the tests allow 3 simulation standard errors below it)
    # a backbone ahead on all 4 formulations, compared with another backbone over its 4 x seeds matched pairs
    "backbone": {(1, 0.0): 0.80, (1, SEED_SD): 0.55, (3, 0.0): 0.99, (3, SEED_SD): 0.99},
    # 10% of the data against 25%: one matched pair per seed
    "data fraction": {(1, 0.0): 0.19, (3, 0.0): 0.87, (3, SEED_SD): 0.64},
    # one configuration ahead of the baselines, compared with one of them (one baseline cell of 120 episodes)
    "baseline": {(1, 0.0): 0.21, (3, 0.0): 0.37, (3, SEED_SD): 0.31},
}


def power_bound(power):
    return power - 3 * np.sqrt(power * (1 - power) / FAMILIES)


@pytest.mark.parametrize("seeds, seed_sd", list(POWER["backbone"]))
def test_a_backbone_15_points_ahead_is_found_with_the_stated_power(seeds, seed_sd):
    shift = np.zeros(CONFIGURATIONS)
    shift[[cell(0, f) for f in range(FORMULATIONS)]] = 0.15
    trained, _ = simulate(seeds, seed_sd, shift, seed=1)
    family = main_effects(trained)
    assert family.resolved[:, 0].mean() >= power_bound(POWER["backbone"][seeds, seed_sd])  # backbone 0 - backbone 1


@pytest.mark.parametrize("seeds, seed_sd", list(POWER["data fraction"]))
def test_a_data_fraction_15_points_behind_is_found_with_the_stated_power(seeds, seed_sd):
    shift = np.zeros(CONFIGURATIONS)
    shift[FRACTION_10] = -0.15
    trained, _ = simulate(seeds, seed_sd, shift, seed=3)
    family = main_effects(trained)
    assert family.resolved[:, 16].mean() >= power_bound(POWER["data fraction"][seeds, seed_sd])  # 10% - 25%


@pytest.mark.parametrize("seeds, seed_sd", list(POWER["baseline"]))
def test_a_configuration_15_points_above_a_baseline_is_found_with_the_stated_power(seeds, seed_sd):
    shift = np.zeros(CONFIGURATIONS)
    shift[0] = 0.15
    trained, baselines = simulate(seeds, seed_sd, shift, seed=2)
    family = against_baselines(trained, baselines)
    assert family.resolved[:, 0].mean() >= power_bound(POWER["baseline"][seeds, seed_sd])


# ---- the parts ---------------------------------------------------------------------------------------------------


def test_holm_multiplies_the_ith_smallest_p_value_by_m_minus_i_plus_1_and_keeps_the_order():
    adjusted = holm(np.array([[0.01, 0.04, 0.03, 0.5]]))
    assert adjusted[0] == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_pairs_that_ran_the_same_episodes_count_episode_noise_once():
    """Three seeds whose differences agree episode by episode: no spread between pairs, and the episode variance
    of one pair, not a third of it."""
    rng = np.random.default_rng(0)
    one = (rng.random(60) < 0.6).astype(float) - (rng.random(60) < 0.4)
    three = comparison_statistics(ComparisonData(paired=np.tile(one, (1, 3, 1)), episodes=60))
    single = comparison_statistics(ComparisonData(paired=one[None, None], episodes=60))
    assert three.episode_variance == pytest.approx(single.episode_variance)
    assert single.episode_variance == pytest.approx(one.var(ddof=1) / 60)
    assert three.between_pairs == pytest.approx(0) and three.episode_part_of_between == pytest.approx(0)


def test_a_comparison_on_fewer_than_the_minimum_episodes_is_never_resolved_nor_counted_in_the_family():
    """-100 points on 2 episodes has no spread at all; it is no test, and the family's other comparison is
    adjusted as one of one."""
    tiny = ComparisonData(paired=np.array([[[-1.0, -1.0]]]), episodes=2)
    clear = ComparisonData(paired=np.concatenate([np.ones((1, 1, 20)), np.zeros((1, 1, 20))], axis=2),
                           episodes=40)
    family = family_verdicts([comparison_statistics(tiny), comparison_statistics(clear)])
    assert MIN_PAIRED_EPISODES > 2 and family.tested.tolist() == [False, True]
    assert not family.resolved[0, 0] and np.isnan(family.p_holm[0, 0])
    assert family.p_holm[0, 1] == pytest.approx(family.p_value[0, 1]) and family.resolved[0, 1]


def test_pairs_whose_episodes_cannot_be_matched_are_compared_as_independent_samples():
    """60/120 against 50/120 with no episode matched: the binomial variance of two independent rates."""
    data = ComparisonData(unpaired_difference=np.array([[10 / 120]]),
                          unpaired_variance=np.array([[0.5 * 0.5 / 119 + (50 / 120) * (70 / 120) / 119]]),
                          episodes=120)
    family = family_verdicts([comparison_statistics(data)])
    assert family.low[0, 0] == pytest.approx(-0.043, abs=0.005) and family.high[0, 0] == pytest.approx(0.21, abs=0.005)
    assert not family.resolved[0, 0]


def test_comparisons_of_one_episode_neither_break_the_family_nor_get_an_interval():
    one = ComparisonData(paired=np.array([[[1.0], [0.0]]]), episodes=1)  # two pairs of one episode each
    rng = np.random.default_rng(0)
    enough = ComparisonData(paired=(rng.random((1, 2, 60)) < 0.7) - (rng.random((1, 2, 60)) < 0.5).astype(float),
                            episodes=60)
    family = family_verdicts([comparison_statistics(one), comparison_statistics(enough)])
    assert np.isnan(family.low[0, 0]) and not family.resolved[0, 0]
    assert np.isfinite(family.low[0, 1]) and np.isfinite(family.between_pairs_variance).all()
