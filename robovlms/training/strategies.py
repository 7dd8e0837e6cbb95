"""How the processes of one cell share the work: Lightning's strategy for a config, and what each one needs.

    auto               one process; several (devices > 1 or num_nodes > 1) train as ddp
    ddp                every process holds the whole model and optimiser; gradients are averaged
    fsdp               weights, gradients and optimiser states sharded over the processes, gathered a decoder layer
                       at a time (PyTorch's FullyShardedDataParallel, each of the backbone's `block_classes` wrapped)
    deepspeed_stage_2  DeepSpeed ZeRO-2: gradients and optimiser states sharded (pip install robovlms[deepspeed])
    deepspeed_stage_3  ZeRO-3: the weights too

docs/scaling.md says which to use for which model and how many GPUs.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from robovlms.backbone import Backbone, check_backbone_settings
from robovlms.errors import ConfigError, MissingDependencyError
from robovlms.training.config import TrainingConfig

SHARDING = ("fsdp", "deepspeed_stage_2", "deepspeed_stage_3")  # Lightning runs these on CUDA GPUs only


def processes_per_machine(config: TrainingConfig) -> int:
    """The processes that train one cell on each machine: `devices`, or for "auto" one per GPU this process sees."""
    if config.devices != "auto":
        return config.devices
    gpus = config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.cuda.device_count() if gpus else 1


def is_distributed(config: TrainingConfig) -> bool:
    return processes_per_machine(config) > 1 or config.num_nodes > 1


def check_training(config: TrainingConfig) -> None:
    """What can be checked before anything is built, beyond the config's own keys: the backbone's and the
    formulation's own settings, that the backbone supports what is asked of it, and that the strategy can hold its
    weights."""
    from robovlms.formulation import FORMULATIONS

    backbone = config.backbone
    backbone_class = check_backbone_settings(backbone.name, backbone.size, backbone.path, backbone.options)
    FORMULATIONS.get(config.formulation.name).check_settings(config.history, config.chunk, config.formulation.options)
    if config.gradient_checkpointing and not backbone_class.supports_gradient_checkpointing():
        raise ConfigError(f"backbone {config.backbone.name!r} does not support gradient_checkpointing; set it false, "
                          f"or train with a smaller batch_size and more accumulate_grad_batches")
    if config.strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise MissingDependencyError(f"strategy {config.strategy} needs DeepSpeed: pip install robovlms[deepspeed]")
    if config.strategy == "fsdp" and config.backbone.dtype != "float32" and config.precision != "bf16-true":
        raise ConfigError(f"strategy fsdp shards each layer's weights as one flat tensor of one dtype, so it cannot "
                          f"hold {config.backbone.dtype} weights beside float32 LoRA adapters; use backbone.dtype "
                          f"float32 (fsdp keeps only a shard of it on each GPU), or strategy ddp")


def check_machine(config: TrainingConfig) -> None:
    """What this machine must have for the config: checked where it trains, not where a sweep is dispatched."""
    wants_gpu = lightning_accelerator(config) in ("gpu", "cuda")
    if config.strategy in SHARDING and not torch.cuda.is_available():
        raise ConfigError(f"strategy {config.strategy} trains on CUDA GPUs only and this machine has none; use "
                          f"strategy ddp")
    if wants_gpu and not torch.cuda.is_available():
        raise ConfigError(f"accelerator {config.accelerator}: this machine has no CUDA GPU (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use accelerator auto")
    if wants_gpu and config.devices != "auto" and config.devices > torch.cuda.device_count():
        raise ConfigError(f"devices {config.devices}: this worker sees {torch.cuda.device_count()} GPU(s); a sweep "
                          f"worker gets as many as its cells' devices (docs/scaling.md)")


def lightning_strategy(config: TrainingConfig, backbone: Backbone):
    """Lightning's strategy object (or name) for the config."""
    if not is_distributed(config) and config.strategy in ("auto", "ddp"):
        return "auto"
    if config.strategy in ("auto", "ddp"):
        from lightning.pytorch.strategies import DDPStrategy

        # a formulation may leave a module of its backbone unused (an LM head the policy never reads); DDP's
        # static_graph, which would find them once, fails with gradient accumulation and validation
        return DDPStrategy(find_unused_parameters=True)
    if config.strategy == "fsdp":
        return _fsdp_strategy(backbone)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=int(config.strategy[-1]))


def _fsdp_strategy(backbone: Backbone):
    from lightning.pytorch.strategies import FSDPStrategy

    # Full checkpoints: one file, which resuming, evaluation and `load_formulation` read like any other. LoRA and
    # partly frozen backbones keep their parameters' own requires_grad (use_orig_params).
    return FSDPStrategy(auto_wrap_policy=set(backbone.block_classes()) or None, use_orig_params=True,
                        state_dict_type="full")


def lightning_accelerator(config: TrainingConfig) -> str:
    """Lightning's accelerator: `auto` is `gpu` for the strategies that shard (they run on CUDA only)."""
    return "gpu" if config.accelerator == "auto" and config.strategy in SHARDING else config.accelerator


def lightning_refused(error: Exception) -> ConfigError:
    """Lightning's refusal of a combination of settings (16-mixed on a CPU, more devices than GPUs) as one line."""
    return ConfigError("Lightning refused these training settings: " + " ".join(str(error).split()))
