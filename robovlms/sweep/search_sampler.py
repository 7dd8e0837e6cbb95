"""The search's sampler: TPE seeded per trial, so that no trial replays another's draws."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState


def trial_seed(search_seed: int, trial_number: int) -> int:
    return int(np.random.SeedSequence([search_seed, trial_number]).generate_state(1)[0])


class TrialSeededTPESampler(BaseSampler):
    """Optuna's TPE sampler, its random state seeded by the search's seed and the trial's number.

    One TPESampler(seed) per process would replay the same draws in every process: two workers, or a search
    resumed by a new process, would train the same points again. Trial numbers are unique in a study, so seeding by
    them gives every trial its own draws, and a trial's draws depend only on the seed, its number and the trials
    before it."""

    def __init__(self, seed: int):
        self._seed = seed
        self._tpe = TPESampler(seed=seed)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._tpe = TPESampler(seed=trial_seed(self._seed, trial.number))
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
                        ) -> dict[str, Any]:
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
                    ) -> None:
        self._tpe.after_trial(study, trial, state, values)
