"""Training one configuration with Lightning, and the run directory that rebuilds the trained policy.

    config.py       TrainingConfig: every setting, validated before anything is built
    module.py       FormulationModule: what one training step computes for any formulation
    batches.py      batches drawn by step, so a resumed run sees the batches an uninterrupted one would
    checkpoints.py  reading checkpoints as tensors only (any strategy's), and the checkpoint a run resumes from
    precision.py    the dtype each weight is held in, in training and when a trained cell is rebuilt
    strategies.py   how the processes of one cell share the work (ddp, fsdp, deepspeed) and what each needs
    launch.py       a cell of several processes trained in a process group of its own
    run_dir.py      a run directory's files, and the trained formulation rebuilt from them alone
    trainer.py      `train`: the Lightning Trainer over all of the above
"""

from robovlms.training.batches import StepBatchSampler
from robovlms.training.checkpoints import LAST_CHECKPOINT, CheckpointError, read_checkpoint
from robovlms.training.config import STRATEGIES, BackboneSettings, FormulationSettings, TrainingConfig, load_config
from robovlms.training.launch import TrainingProcessError
from robovlms.training.module import FormulationModule, TrainingDivergedError, WarmupCosine
from robovlms.training.run_dir import (BACKBONE_DIR, CHECKPOINT_DIR, CONFIG_FILE, STATISTICS_FILE, TRAINING_TIME_FILE,
                                       build_formulation, load_formulation, training_seconds)
from robovlms.training.strategies import check_training
from robovlms.training.trainer import train

__all__ = ["BACKBONE_DIR", "CHECKPOINT_DIR", "CONFIG_FILE", "LAST_CHECKPOINT", "STATISTICS_FILE", "TRAINING_TIME_FILE",
           "STRATEGIES", "BackboneSettings", "CheckpointError", "FormulationModule", "FormulationSettings",
           "StepBatchSampler", "TrainingConfig", "TrainingDivergedError", "TrainingProcessError", "WarmupCosine",
           "build_formulation", "check_training", "load_config", "load_formulation", "read_checkpoint", "train",
           "training_seconds"]
