"""What a sweep worker loads once, before its first cell, so that no cell's training time absorbs it: the
backbone and formulation plugins its cells use, transformers' model code, and the TensorBoard writer that
Lightning's logger opens at a cell's first log. Loaded lazily instead, they cost the first cell of each worker
up to a minute on a busy machine, which the cost table then charged to that cell's formulation.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterable

logger = logging.getLogger(__name__)

# imported by a process's first training and by none after it (found by comparing sys.modules around two)
FIRST_TRAINING_MODULES = ("transformers.modeling_utils", "transformers.processing_utils",
                          "transformers.image_processing_utils", "transformers.masking_utils",
                          "transformers.modeling_layers", "torch.utils.tensorboard", "pydantic.type_adapter",
                          "torch.utils.serialization", "torch.profiler._cupti_monitor",
                          "fsspec.implementations.chained")


def warm_up(backbones: Iterable[str], formulations: Iterable[str]) -> float:
    """Load the named plugins and what a first training imports; the seconds it took."""
    from robovlms.backbone import BACKBONES
    from robovlms.formulation import FORMULATIONS

    started = time.perf_counter()
    for module in FIRST_TRAINING_MODULES:
        importlib.import_module(module)
    for name in backbones:
        BACKBONES.get(name)
    for name in formulations:
        FORMULATIONS.get(name)
    return time.perf_counter() - started


def plugin_names(trainings: Iterable[dict]) -> tuple[set[str], set[str]]:
    """The backbones and formulations that training settings (cells' `training`) name."""
    from robovlms.training import TrainingConfig

    defaults = TrainingConfig.model_fields
    backbones, formulations = set(), set()
    for training in trainings:
        backbones.add((training.get("backbone") or {}).get("name", defaults["backbone"].default.name))
        formulations.add((training.get("formulation") or {}).get("name", defaults["formulation"].default.name))
    return backbones, formulations
