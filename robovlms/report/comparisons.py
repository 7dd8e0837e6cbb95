"""Paired comparisons of success and their family-wise verdicts: the statistics behind "resolved".

A comparison (level a against level b of an axis, or a configuration against a baseline) holds K matched pairs of
cells; each pair ran the same evaluation episodes where its records say so (matched by episode identity) and is
compared episode by episode, otherwise as two independent samples. Its difference is the mean over pairs of
(success of a - success of b). Two sources of noise make that difference uncertain:

- episode noise: which episodes were drawn. Pairs that ran the same episodes share it, so it is measured once, from
  each episode's difference averaged over the pairs (`episode_variance`), never once per pair and again across
  pairs (resampling pairs and then episodes within each counts it twice);
- pair noise: how much a pair's difference varies beyond its episode noise, from one training seed to another and
  from one level of the other axes to another (`between_pairs`). It is estimated from the spread of the pairs'
  differences less the part episode noise explains, pooled over every comparison of a family with two or more pairs
  (one seed and one pair per comparison leave nothing to estimate it from: such a family covers episode noise only).

The difference's standard error combines both, with Satterthwaite's degrees of freedom for a t interval and a
two-sided p-value. A family's verdicts are Holm-adjusted: "resolved" means the Holm-adjusted p-value is below 0.05,
so the chance of calling any difference of the family resolved when none exists stays within 5%. A comparison of
fewer than MIN_PAIRED_EPISODES episodes per pair is never resolved and is no test of the family.

Every function takes a stack of R replicate families (a report passes R = 1; the calibration tests in
tests/test_comparisons.py pass hundreds of simulated ones), so arrays lead with R.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
from scipy import sparse, stats

CONFIDENCE = 0.95
FAMILY_ERROR = 0.05  # the family-wise error rate Holm's procedure keeps "resolved" within
# Below 30 episodes per pair, the interval's normal (t) approximation of a mean of binary differences is off: a
# difference on 2 episodes can have no spread at all and read "-100 [-100, -100]". tests/test_comparisons.py
# measures a single comparison's false-resolved rate at 10 episodes per pair against 30.
MIN_PAIRED_EPISODES = 30


@dataclass
class ComparisonData:
    """The matched pairs of one comparison, for R replicate families.

    paired: (R, K, E) per-episode differences (a - b, each 0 or 1) of the K pairs that ran the same episodes,
        aligned on the E episode identities they ran; NaN where a pair did not run that episode. None: no such pair.
    unpaired_difference, unpaired_variance: (R, U) difference of rates and its variance (the sum of each cell's
        binomial variance) of the U pairs whose episodes cannot be matched. None: no such pair.
    episodes: episodes per pair, the fewest over the comparison's pairs (a pair compared unpaired counts its
        smaller cell).
    cells: the two cells of each pair (any hashable names), paired pairs first: comparisons of a family share cells
        (the demo's backbone and formulation comparisons are made of the same 16 cells), which decides how much the
        family's pooled pair noise can be known. None: every pair's cells are its own.
    """

    paired: np.ndarray | None = None
    unpaired_difference: np.ndarray | None = None
    unpaired_variance: np.ndarray | None = None
    episodes: int = 0
    cells: list[tuple[Hashable, Hashable]] | None = None

    @property
    def pairs(self) -> int:
        return sum(array.shape[1] for array in (self.paired, self.unpaired_difference) if array is not None)


@dataclass
class ComparisonStatistics:
    """What one comparison contributes to its family, for R replicates: (R,) arrays."""

    difference: np.ndarray  # mean over pairs of (a - b)
    episode_variance: np.ndarray  # variance of `difference` from episode noise, shared episodes counted once
    between_pairs: np.ndarray  # sum over pairs of (pair difference - difference)^2
    episode_part_of_between: np.ndarray  # what episode noise alone puts into `between_pairs`, in expectation
    pairs: int
    episodes: int  # per pair, the fewest
    cells: list[tuple[Hashable, Hashable]]


def comparison_statistics(data: ComparisonData) -> ComparisonStatistics:
    with np.errstate(divide="ignore", invalid="ignore"):  # a pair of one episode has no variance: NaN
        return _comparison_statistics(data)


def _comparison_statistics(data: ComparisonData) -> ComparisonStatistics:
    differences, variances = [], []  # per pair: (R, k) each
    episode_variance = 0.0
    if data.paired is not None:
        paired = np.asarray(data.paired, dtype=float)
        ran = ~np.isnan(paired)  # (R, K, E) whether each pair ran each episode
        complete = bool(ran.all())
        if not complete:
            paired = np.where(ran, paired, 0.0)
        counts = ran.sum(axis=2) if not complete else np.full(paired.shape[:2], paired.shape[2])  # (R, K)
        means = paired.sum(axis=2) / counts  # (R, K)
        deviations = paired - means[..., None]  # (R, K, E)
        if not complete:
            deviations *= ran
        differences.append(means)
        variances.append(np.sum(deviations ** 2, axis=2) / (counts - 1) / counts)
        # episodes are the clusters: a pair's mean is sum_e deviation_e / count; the comparison's is its mean over
        # all pairs, so each episode contributes the sum over pairs of deviation / (count * pairs)
        contributions = np.sum(deviations / (counts[..., None] * data.pairs), axis=1)  # (R, E)
        clusters = ran.any(axis=1).sum(axis=1)  # (R,) episodes any pair ran
        episode_variance = np.sum(contributions ** 2, axis=1) * clusters / (clusters - 1)
    if data.unpaired_difference is not None:
        differences.append(np.asarray(data.unpaired_difference, dtype=float))
        variances.append(np.asarray(data.unpaired_variance, dtype=float))
        episode_variance = episode_variance + np.sum(variances[-1], axis=1) / data.pairs ** 2
    per_pair, pair_variance = np.concatenate(differences, axis=1), np.concatenate(variances, axis=1)  # (R, K)
    difference = per_pair.mean(axis=1)
    return ComparisonStatistics(
        difference=difference, episode_variance=np.asarray(episode_variance),
        between_pairs=np.sum((per_pair - difference[:, None]) ** 2, axis=1),
        episode_part_of_between=pair_variance.sum(axis=1) - data.pairs * episode_variance,
        pairs=data.pairs, episodes=data.episodes,
        cells=data.cells if data.cells is not None else [(object(), object()) for _ in range(data.pairs)])


@dataclass
class FamilyVerdicts:
    """Each comparison of a family, for R replicates: (R, M) arrays, M the family's comparisons."""

    difference: np.ndarray
    standard_error: np.ndarray
    degrees_of_freedom: np.ndarray
    low: np.ndarray  # the comparison's own 95% interval, not adjusted for the family
    high: np.ndarray
    p_value: np.ndarray  # two-sided, not adjusted
    p_holm: np.ndarray  # Holm-adjusted over the family's tests; NaN for a comparison that is no test
    resolved: np.ndarray  # p_holm < FAMILY_ERROR
    tested: np.ndarray  # (M,) whether the comparison is a test of the family (enough episodes per pair)
    between_pairs_variance: np.ndarray  # (R,) the pooled variance of a pair's difference beyond episode noise
    between_pairs_df: float  # its effective degrees of freedom; 0: the family's intervals cover episode noise only


def family_verdicts(comparisons: list[ComparisonStatistics]) -> FamilyVerdicts:
    """Pool the pair noise over the family, then test each comparison and adjust the family's p-values by Holm."""
    difference = np.stack([c.difference for c in comparisons], axis=1)  # (R, M)
    episode_variance = np.stack([np.broadcast_to(c.episode_variance, c.difference.shape) for c in comparisons],
                                axis=1)
    pairs = np.array([c.pairs for c in comparisons])
    episodes = np.array([c.episodes for c in comparisons])
    episode_df = np.maximum(episodes - 1, 1)
    # the pair noise is pooled over the comparisons that can tell it: two pairs or more, each of enough episodes
    replicated = [c for c in comparisons if c.pairs >= 2 and c.episodes >= MIN_PAIRED_EPISODES]
    df_between = sum(c.pairs - 1 for c in replicated)
    known_df = effective_degrees_of_freedom(replicated)
    if df_between:
        # the pairs' spread (a mean square of df_between degrees of freedom) less what episode noise puts into it
        spread = sum(c.between_pairs for c in replicated) / df_between  # (R,)
        noise = sum(c.episode_part_of_between for c in replicated) / df_between
        noise_df = sum(c.pairs * (c.episodes - 1) for c in replicated)
        between = np.maximum(spread - noise, 0.0)
    else:
        spread = noise = between = np.zeros(difference.shape[0])
        noise_df = 1
    pair_part = between[:, None] / pairs  # (R, M)
    variance = pair_part + episode_variance
    with np.errstate(divide="ignore", invalid="ignore"):
        # Satterthwaite, for spread / K - noise / K + episode variance: the pairs' spread is the uncertain term
        df = np.where(pair_part > 0, variance ** 2 / ((spread[:, None] / pairs) ** 2 / max(known_df, 1)
                                                      + (noise[:, None] / pairs) ** 2 / noise_df
                                                      + episode_variance ** 2 / episode_df), episode_df)
        standard_error = np.sqrt(variance)
        statistic = np.abs(difference) / standard_error
    p_value = np.where(standard_error > 0, 2 * stats.t.sf(statistic, df), np.where(difference == 0, 1.0, 0.0))
    half_width = stats.t.ppf(0.5 + CONFIDENCE / 2, df) * standard_error
    tested = episodes >= MIN_PAIRED_EPISODES
    p_holm = np.full_like(p_value, np.nan)
    if tested.any():
        p_holm[:, tested] = holm(p_value[:, tested])
    return FamilyVerdicts(difference=difference, standard_error=standard_error, degrees_of_freedom=df,
                          low=difference - half_width, high=difference + half_width, p_value=p_value, p_holm=p_holm,
                          resolved=p_holm < FAMILY_ERROR, tested=tested, between_pairs_variance=between,
                          between_pairs_df=known_df)


def effective_degrees_of_freedom(comparisons: list[ComparisonStatistics]) -> float:
    """How many independent pieces of information the pooled spread of the comparisons' pairs holds. Summed over
    comparisons, it is a quadratic form in the cells' own noise, u'Au (each pair's difference is its a-cell's minus
    its b-cell's); with independent cell noise its degrees of freedom are tr(A)^2 / tr(A^2) (Satterthwaite). For
    comparisons that share no cells that is the sum over comparisons of (pairs - 1); for the one-seed demo, whose
    backbone and formulation comparisons all read the interaction of one 4 x 4 table, it is about 9, not 36."""
    cells = dict.fromkeys(name for comparison in comparisons for pair in comparison.cells for name in pair)
    names = {name: index for index, name in enumerate(cells)}
    rows, columns, values = [], [], []  # the centred designs of every comparison, stacked: (pairs, cells), sparse
    offset = 0
    for comparison in comparisons:
        local = {name: index for index, name in enumerate(dict.fromkeys(name for pair in comparison.cells
                                                                          for name in pair))}
        design = np.zeros((comparison.pairs, len(local)))  # +1 at a pair's a-cell, -1 at its b-cell
        for row, (a, b) in enumerate(comparison.cells):
            design[row, local[a]] += 1
            design[row, local[b]] -= 1
        centred = design - design.mean(axis=0)
        row, column = np.nonzero(centred)
        rows += (row + offset).tolist()
        ordered = list(local)
        columns += [names[ordered[index]] for index in column]
        values += centred[row, column].tolist()
        offset += comparison.pairs
    design = sparse.csr_matrix((values, (rows, columns)), shape=(offset, len(names)))
    quadratic = (design.T @ design).tocsr()  # A, (cells, cells)
    trace = quadratic.diagonal().sum()
    return float(trace ** 2 / quadratic.multiply(quadratic).sum()) if trace > 0 else 0.0


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of (R, M) p-values, each row one family: the i-th smallest of M is multiplied by
    M - i + 1, and no adjusted value is below one of a smaller p-value. Valid under any dependence between tests."""
    tests = p_values.shape[1]
    order = np.argsort(p_values, axis=1)
    ranked = np.take_along_axis(p_values, order, axis=1) * (tests - np.arange(tests))
    adjusted = np.minimum(np.maximum.accumulate(ranked, axis=1), 1.0)
    out = np.empty_like(adjusted)
    np.put_along_axis(out, order, adjusted, axis=1)
    return out
