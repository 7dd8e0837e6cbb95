"""A training run's settings: every key validated before anything is built, with the valid ones named."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from robovlms.errors import ConfigError, config_error
from robovlms.recipes import expand_recipe
from robovlms.yaml_files import read_yaml_mapping

# Upper bounds of plausible settings: beyond them a value is a typo (1e15 steps, a batch of a billion windows).
MAX_STEPS = 10_000_000
MAX_BATCH_SIZE = 65_536
MAX_COUNT = 1_000_000
MAX_WINDOW = 1024  # frames of history, actions of a chunk
MAX_DEVICES = 1024  # processes of one cell on one machine

# How the processes of one cell share the work (Lightning's strategies; docs/scaling.md): auto is one process, or
# ddp for several; ddp copies the model on each, fsdp shards weights, gradients and optimiser states, deepspeed's
# ZeRO stage 2 shards gradients and optimiser states, stage 3 the weights too.
STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")
STRATEGY = Literal[STRATEGIES]
HALF_PRECISION = {"bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "16-mixed": "float16"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a learning rate of .inf is a typo too


class BackboneSettings(_Strict):
    name: str = "gpt-scratch"
    size: Literal["tiny", "pretrained"] = "tiny"
    path: str | None = None  # a local directory or cached model id, for size "pretrained"
    options: dict[str, Any] = {}  # overrides of the tiny config
    freeze: Literal["full", "frozen-vision", "frozen-language", "frozen-vision-and-embeddings", "lora"] = "full"
    lora_rank: int = Field(8, ge=1, le=4096, strict=True)
    lora_targets: Literal["attention", "all-linear"] = "attention"  # all-linear: RoboVLMs' choice
    lora_alpha: int | None = Field(None, ge=1, le=65_536, strict=True)  # adapters scaled alpha/rank; None: the rank
    lora_dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the adapters' input (RoboVLMs: 0.05)
    # the dtype the weights are held in: float32 keeps fp32 master weights under mixed precision, whatever dtype a
    # pretrained checkpoint was saved in; bfloat16 or float16 halve the weights' memory (with precision bf16-true)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class FormulationSettings(_Strict):
    name: str = "policy-head"
    options: dict[str, Any] = {}  # the formulation's own settings (its config dataclass)


class TrainingConfig(_Strict):
    store: str
    run_dir: str
    # a named set of settings expanded before validation, the settings given beside it winning (robovlms/recipes.py)
    recipe: str | None = None
    backbone: BackboneSettings = BackboneSettings()
    formulation: FormulationSettings = FormulationSettings()
    history: int = Field(1, ge=1, le=MAX_WINDOW, strict=True)  # H frames per window
    chunk: int = Field(1, ge=1, le=MAX_WINDOW, strict=True)  # L future actions predicted per frame
    # env steps between history frames; = chunk for `execution: chunk` with H > 1
    frame_stride: int = Field(1, ge=1, le=MAX_WINDOW, strict=True)
    use_state: bool = True  # proprio state as an input
    state_input: Literal["add", "token"] = "add"  # added to the [LRN] embedding, or a token of its own (RoboVLMs)
    cameras: list[str] | None = None  # default: every camera of the store
    augment: bool = False  # random shifts and colour jitter of training images (robovlms/augmentation.py)
    data_fraction: float = Field(1.0, gt=0, le=1)  # of the episodes left after validation's, nested across fractions
    # few-shot: at most N training episodes of each task, nested
    episodes_per_task: int | None = Field(None, ge=1, le=MAX_COUNT, strict=True)
    validation_fraction: float = Field(0.0, ge=0, lt=1)  # episodes per task held out for val/loss (same for any seed)
    validate_every: int = Field(100, ge=1, le=MAX_STEPS, strict=True)  # steps between validations
    validation_batches: int = Field(4, ge=1, le=MAX_COUNT, strict=True)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH_SIZE, strict=True)  # per device
    max_steps: int = Field(1000, ge=1, le=MAX_STEPS, strict=True)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, strict=True)
    weight_decay: float = Field(0.01, ge=0)
    # Lightning's spellings: 32-bit, bf16 autocast over fp32 weights, bf16 weights throughout, fp16 autocast with
    # loss scaling (docs/scaling.md)
    precision: Literal["32", "bf16-mixed", "bf16-true", "16-mixed"] = "32"
    accumulate_grad_batches: int = Field(1, ge=1, le=MAX_COUNT, strict=True)  # micro-batches per optimiser step
    gradient_checkpointing: bool = False  # recompute the backbone's activations in backward (transformers' own)
    gradient_clip: float | None = Field(1.0, gt=0)
    seed: int = Field(0, strict=True)
    execution: Literal["first", "ensemble", "chunk"] = "first"  # how a rollout executes a predicted chunk
    checkpoint_every: int = Field(100, ge=1, le=MAX_STEPS, strict=True)
    log_every: int = Field(10, ge=1, le=MAX_STEPS, strict=True)
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"  # Lightning's
    # processes (one per GPU) training one cell on each machine, or "auto": every GPU this worker sees
    devices: int | Literal["auto"] = 1
    num_nodes: int = Field(1, ge=1, le=MAX_COUNT, strict=True)  # machines training one cell together
    strategy: STRATEGY = "auto"  # how the processes of one cell share the work

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, devices: Any) -> Any:
        if devices == "auto" or (type(devices) is int and 1 <= devices <= MAX_DEVICES):
            return devices
        raise PydanticCustomError("devices", f"should be a number of processes from 1 to {MAX_DEVICES}, or auto "
                                             f"(one per GPU this worker sees)")


def load_config(source: TrainingConfig | dict[str, Any] | str | Path) -> TrainingConfig:
    """A TrainingConfig from itself, a dict or a YAML file; every error names the bad key and the valid ones."""
    if isinstance(source, TrainingConfig):
        return source
    if not isinstance(source, dict):
        source = read_yaml_mapping(source, "training settings")
    if source.get("strategy") == "ddp_spawn":  # what made `ddp` inside a sweep work before robovlms launched ranks
        raise ConfigError("strategy ddp_spawn: robovlms starts a cell's processes itself, so use strategy ddp "
                          "(the same training, without pickling the model into each process)")
    source = expand_recipe(source, FormulationSettings.model_fields["name"].default)
    try:
        config = TrainingConfig.model_validate(source)
    except ValidationError as error:
        raise config_error("invalid training config", TrainingConfig, error) from None
    if config.state_input == "token" and not config.use_state:
        raise ConfigError("state_input token gives the proprio state a token of its own: it needs use_state true")
    check_precision(config)
    return config


def check_precision(config: TrainingConfig) -> None:
    """The dtype the backbone's weights are held in (`backbone.dtype`) and the precision Lightning computes in
    must make one of the recipes of docs/scaling.md."""
    dtype, precision = config.backbone.dtype, config.precision
    if precision == "bf16-true" and dtype != "bfloat16":
        raise ConfigError(f"precision bf16-true holds every weight in bfloat16: set backbone.dtype: bfloat16 too "
                          f"(now {dtype}), or use precision bf16-mixed to keep fp32 master weights")
    if dtype == "float32":
        return
    if precision == "32":
        raise ConfigError(f"backbone.dtype {dtype} needs a half precision to compute in: precision bf16-mixed or "
                          f"16-mixed (now 32), or backbone.dtype float32")
    if HALF_PRECISION[precision] != dtype:
        raise ConfigError(f"backbone.dtype {dtype} and precision {precision} mix two half types; use "
                          f"backbone.dtype {HALF_PRECISION[precision]} with precision {precision}")
    if precision != "bf16-true" and config.backbone.freeze != "lora":
        raise ConfigError(f"backbone.dtype {dtype} with freeze {config.backbone.freeze} would train {dtype} weights "
                          f"without an fp32 master copy (AdamW's small updates are lost in them); use backbone.dtype "
                          f"float32 (fp32 master weights, {dtype} compute under precision {precision}), freeze: lora "
                          f"(the frozen weights in {dtype}, the adapters in float32), or precision bf16-true to "
                          f"train in bfloat16 throughout")
