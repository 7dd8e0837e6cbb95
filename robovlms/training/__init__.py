"""Training one configuration with Lightning, and the run directory that rebuilds the trained policy.

    config.py       TrainingConfig: every setting, validated before anything is built
    module.py       FormulationModule: what one training step computes for any formulation
    batches.py      batches drawn by step, so a resumed run sees the batches an uninterrupted one would
    checkpoints.py  reading checkpoints as tensors only, and the checkpoint a run resumes from
    run_dir.py      a run directory's files, and the trained formulation rebuilt from them alone
    trainer.py      `train`: the Lightning Trainer over all of the above
"""

from robovlms.training.batches import StepBatchSampler
from robovlms.training.checkpoints import LAST_CHECKPOINT, CheckpointError, read_checkpoint
from robovlms.training.config import BackboneSettings, FormulationSettings, TrainingConfig, load_config
from robovlms.training.module import FormulationModule, TrainingDivergedError, WarmupCosine
from robovlms.training.run_dir import (BACKBONE_DIR, CHECKPOINT_DIR, CONFIG_FILE, STATISTICS_FILE, TRAINING_TIME_FILE,
                                       build_formulation, load_formulation, training_seconds)
from robovlms.training.trainer import train

__all__ = ["BACKBONE_DIR", "CHECKPOINT_DIR", "CONFIG_FILE", "LAST_CHECKPOINT", "STATISTICS_FILE", "TRAINING_TIME_FILE",
           "BackboneSettings", "CheckpointError", "FormulationModule", "FormulationSettings", "StepBatchSampler",
           "TrainingConfig", "TrainingDivergedError", "WarmupCosine", "build_formulation", "load_config",
           "load_formulation", "read_checkpoint", "train", "training_seconds"]
