"""The formulation interface: how a backbone's hidden states become robot actions, and the registry of them.

A formulation is an nn.Module around a backbone with two halves:

    encode(images, state, instructions) -> per-frame tensors (B, T, ...), each frame independent of the others
    predict(encoded, instructions)      -> the chunk (B, L, A) for the last frame, normalised

`loss(batch)` trains it on windows of an episode store. The split lets a rollout policy encode each new frame
once and keep it: for `policy-head` the encoding is the backbone pass, so a step costs one pass whatever H is.
Formulations that sample (the generative action objectives) draw from the `generator` that `predict`, `act` and
`loss` take: the rollout policy seeds one per episode, training one per step; without one they draw from torch's
global generator. A formulation class that sets `batched_rollouts` in its own body lets the rollout policy server
(robovlms/serving/) stack the windows of several episodes in one `predict`: it then takes a list of generators, one
per row, and a row's output depends on that row alone.

Actions are normalised, by default with the store's statistics: each arm dimension is clipped to its 1st/99th
percentile and scaled to [-1, 1] (`action_normalisation: percentiles`, OpenVLA's choice); or, as RoboVLMs does, every
arm dimension is clipped to the fixed bounds [-action_clip, action_clip] and scaled to [-1, 1]
(`action_normalisation: clip`). The gripper (the last dimension) is a binary, closed when its raw value is positive.
Formulations register in FORMULATIONS; built-in and third-party ones declare an entry point in the group
`robovlms.formulations` naming their Formulation subclass. docs/adding-a-formulation.md walks through writing one
(examples/robovlms-gru-head-plugin), and `robovlms check-formulation NAME` checks it on every built-in backbone.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from robovlms.action_objectives import (
    ARM_LOSSES,
    GRIPPER_HEADS,
    HEAD_ACTIVATIONS,
    HEAD_INITS,
    OBJECTIVES,
    create_action_objective,
)
from robovlms.backbone import Backbone
from robovlms.data.store import Statistics
from robovlms.errors import ConfigError, StoreError, UnknownNameError
from robovlms.registry import FORMULATIONS, plugin_options

STATE_INPUTS = ("add", "token")
ACTION_NORMALISATIONS = ("percentiles", "clip")
LRN_INITS = ("random", "zeros")


class RangeNormaliser(nn.Module):
    """Per dimension: clip to [low, high], then scale to [-1, 1]. A dimension with low == high maps to -1."""

    def __init__(self, low: list[float], high: list[float]):
        super().__init__()
        self.register_buffer("low", torch.tensor(low, dtype=torch.float32))
        self.register_buffer("high", torch.tensor(high, dtype=torch.float32))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        span = (self.high - self.low).clamp_min(1e-6)
        return 2 * (torch.minimum(torch.maximum(x, self.low), self.high) - self.low) / span - 1

    def unnormalise(self, y: torch.Tensor) -> torch.Tensor:
        return (y.clamp(-1, 1) + 1) / 2 * (self.high - self.low) + self.low


class ActionNormaliser(nn.Module):
    """Raw actions (..., A) <-> normalised arm (..., A-1) in [-1, 1] and a binary gripper (...) in {0, 1}. The arm's
    range: each dimension's 1st/99th percentile (`percentiles`), or [-clip, clip] for every dimension (`clip`)."""

    def __init__(self, statistics: Statistics, normalisation: str = "percentiles", clip: float = 0.65):
        super().__init__()
        if normalisation not in ACTION_NORMALISATIONS:
            raise UnknownNameError("action normalisation", normalisation, ACTION_NORMALISATIONS)
        arm_dims = len(statistics.p01) - 1
        if normalisation == "clip":
            self.arm = RangeNormaliser([-clip] * arm_dims, [clip] * arm_dims)
        else:
            self.arm = RangeNormaliser(statistics.p01[:-1], statistics.p99[:-1])

    def normalise(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.arm.normalise(actions[..., :-1]), (actions[..., -1] > 0).float()

    def unnormalise(self, arm: torch.Tensor, gripper_closed: torch.Tensor) -> torch.Tensor:
        """gripper_closed: a probability or a binary; raw gripper is +1 (closed) or -1 (open)."""
        gripper = torch.where(gripper_closed > 0.5, 1.0, -1.0).to(arm.dtype)
        return torch.cat([self.arm.unnormalise(arm), gripper.unsqueeze(-1)], dim=-1)


class ActionDiscretiser:
    """`bins` uniform bins over [-1, 1]; a value becomes the index of its bin and comes back as the bin centre,
    so the round trip is off by at most half a bin (1 / bins)."""

    def __init__(self, bins: int):
        if bins < 2:
            raise ConfigError(f"action bins must be at least 2, got {bins}")
        self.bins = bins

    def discretise(self, values: torch.Tensor) -> torch.Tensor:
        return ((values.clamp(-1, 1) + 1) / 2 * self.bins).floor().long().clamp(0, self.bins - 1)

    def undiscretise(self, indices: torch.Tensor) -> torch.Tensor:
        return (indices.float() + 0.5) * (2 / self.bins) - 1


def check_statistics(statistics: Statistics | None, what: str, dim: int, store: str) -> Statistics:
    """The 1st/99th percentiles a formulation normalises with, finite and one per dimension."""
    ok = statistics is not None and all(
        isinstance(values, list) and len(values) == dim and all(v is not None and math.isfinite(v) for v in values)
        for values in (statistics.p01, statistics.p99))
    if not ok:
        raise StoreError(f"the store {store} has no usable {what} statistics (finite p01 and p99 for each of "
                         f"{dim} dimensions); regenerate or re-import it so its meta.json carries them")
    return statistics


@dataclass
class FormulationConfig:
    """Options every formulation takes: how actions are normalised and how the [LRN] action token starts."""

    action_normalisation: str = "percentiles"  # percentiles (each arm dimension's 1st/99th) | clip (RoboVLMs)
    action_clip: float = 0.65  # clip: every arm dimension clipped to [-action_clip, action_clip], then scaled
    lrn_init: str = "random"  # random: normal, the word embeddings' std | zeros (RoboVLMs)


def check_formulation_config(config: FormulationConfig) -> None:
    if config.action_normalisation not in ACTION_NORMALISATIONS:
        raise UnknownNameError("action normalisation", config.action_normalisation, ACTION_NORMALISATIONS)
    if not (math.isfinite(config.action_clip) and config.action_clip > 0):
        raise ConfigError(f"action_clip must be a positive number, got {config.action_clip!r}")
    if config.action_normalisation != "clip" and config.action_clip != FormulationConfig.action_clip:
        raise ConfigError(f"action_clip {config.action_clip} bounds action_normalisation clip; with "
                          f"{config.action_normalisation} the store's percentiles bound each dimension, so leave "
                          f"action_clip out or set action_normalisation: clip")
    if config.lrn_init not in LRN_INITS:
        raise UnknownNameError("[LRN] init", config.lrn_init, LRN_INITS)


@dataclass
class ContinuousActionConfig(FormulationConfig):
    """Settings shared by the formulations that predict continuous chunks from a condition state (the [LRN] hidden
    state, or policy-head's fused history): the action objective (robovlms/action_objectives.py) and its sizes."""

    objective: str = "regression"  # regression | flow-matching | diffusion: how the arm chunk is produced
    arm_loss: str = "huber"  # regression's loss on the normalised arm: mse | huber | l1
    gripper_weight: float = 0.1  # weight of the gripper's binary cross-entropy beside the arm loss
    # hidden widths of the MLP that reads the chunk (regression) or the gripper from the state: one width for two
    # layers, or a list of widths (RoboVLMs: [1024, 512, 256])
    head_width: int | list[int] = 256
    head_activation: str = "gelu"  # gelu | relu (RoboVLMs): between the head's layers
    gripper_head: str = "shared"  # regression: one MLP for arm and gripper | separate: one each (RoboVLMs)
    head_init: str = "default"  # default (PyTorch's) | xavier: Xavier-uniform weights, zero biases (RoboVLMs)
    denoising_steps: int = 10  # flow-matching's Euler steps, diffusion's DDIM steps at inference
    expert_width: int = 256  # the action expert of flow-matching and diffusion: width
    expert_layers: int = 2  # and residual blocks


def check_action_objective(config: ContinuousActionConfig) -> None:
    if config.objective not in OBJECTIVES:
        raise UnknownNameError("action objective", config.objective, OBJECTIVES)
    if config.arm_loss not in ARM_LOSSES:
        raise UnknownNameError("arm loss", config.arm_loss, ARM_LOSSES)
    if config.objective != "regression" and config.arm_loss != ContinuousActionConfig.arm_loss:
        raise ConfigError(f"arm_loss {config.arm_loss} is regression's; {config.objective} trains its action expert "
                          f"with the mean squared error of its papers, so leave arm_loss out")
    for name in ("denoising_steps", "expert_width", "expert_layers"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {getattr(config, name)!r}")
    widths = config.head_width if isinstance(config.head_width, list) else [config.head_width]
    if not widths or not all(isinstance(width, int) and width >= 1 for width in widths):
        raise ConfigError(f"head_width must be a positive integer or a non-empty list of them, got "
                          f"{config.head_width!r}")
    if not (math.isfinite(config.gripper_weight) and config.gripper_weight >= 0):
        raise ConfigError(f"gripper_weight must be a number at least 0, got {config.gripper_weight!r}")
    for name, valid in (("head_activation", HEAD_ACTIVATIONS), ("gripper_head", GRIPPER_HEADS),
                        ("head_init", HEAD_INITS)):
        if getattr(config, name) not in valid:
            raise UnknownNameError(name.replace("_", " "), getattr(config, name), valid)


def embedding_std(backbone: Backbone) -> float:
    """The spread of the word embeddings, at which new embeddings start; 1.0 for a backbone built on the meta
    device, which holds no values (to count parameters and estimate memory)."""
    weight = backbone.input_embeddings().weight
    return 1.0 if weight.is_meta else weight.detach().float().std().item()


class Formulation(nn.Module, abc.ABC):
    """A backbone, an action space and the way one becomes the other.

    A plugin sets `name`, `description` and `config_class` (and `single_frame` if it sees one frame), implements
    `predict` and `loss` (or subclasses ContinuousFormulation and writes `forward`), and may override `encode` and
    `check_settings`. `encode` must treat each frame alone and `predict` draw only from the generator it is given:
    the rollout policy encodes each observation once and seeds one generator per episode.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type]  # the dataclass of this formulation's own options, a FormulationConfig
    single_frame: ClassVar[bool] = False  # sees only the current observation: history must be 1
    history_advice: ClassVar[str] = "use interleaved or policy-head for a history"
    # predict takes several episodes' windows and a list of generators, one per row. Each class says so in its own
    # body (a subclass that changes forward or predict may break it, so it is not inherited); one that does not is
    # served one episode at a time
    batched_rollouts: ClassVar[bool] = False

    @classmethod
    def check_settings(cls, history: int, chunk: int, options: dict[str, Any]):
        """The formulation's own config from `options`, checked with the shared settings, before any model is built."""
        if chunk < 1:
            raise ConfigError(f"chunk must be at least 1, got {chunk}")
        config = plugin_options(cls.config_class, options, "formulation", cls.name)
        if isinstance(config, FormulationConfig):
            check_formulation_config(config)
        if history != 1 and not cls.takes_history(config):
            raise ConfigError(f"{cls.name} sees only the current observation, so history must be 1, not {history}; "
                              f"{cls.history_advice}")
        return config

    @classmethod
    def takes_history(cls, config) -> bool:
        """Whether, with these options, the formulation reads more frames than the current one."""
        return not cls.single_frame

    def __init__(self, backbone: Backbone, action_statistics: Statistics, state_statistics: Statistics | None, *,
                 history: int = 1, chunk: int = 1, use_state: bool = False, state_input: str = "add", **options):
        super().__init__()
        self.config = self.check_settings(history, chunk, options)
        if state_input not in STATE_INPUTS:
            raise UnknownNameError("state input", state_input, STATE_INPUTS)
        self.backbone = backbone
        self.history, self.chunk, self.use_state = history, chunk, use_state
        self.action_dim = len(action_statistics.p01)
        self.actions = ActionNormaliser(action_statistics, self.config.action_normalisation, self.config.action_clip)
        self.state = RangeNormaliser(state_statistics.p01, state_statistics.p99) if use_state else None
        D = backbone.hidden_size
        if self.config.lrn_init == "zeros":
            self.lrn = nn.Parameter(torch.zeros(D))  # the learnable [LRN] action token
        else:
            self.lrn = nn.Parameter(torch.randn(D) * embedding_std(backbone))
        self.state_embedding = nn.Linear(len(state_statistics.p01), D) if use_state else None
        self.state_token = use_state and state_input == "token"

    def lrn_embeds(self, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every frame's suffix up to its [LRN] (B, T, K, D), the [LRN] embedding last: with the proprio state
        `add`ed, K = 1 and the state's linear embedding is added to the [LRN]'s; as a `token` (RoboVLMs), K = 2
        and the state's embedding is a token of its own just before the [LRN]. Without state, K = 1."""
        B, T = encoded["state"].shape[:2]
        lrn = self.lrn.expand(B, T, 1, -1)
        if self.state_embedding is None:
            return lrn
        state = self.state_embedding(encoded["state"]).unsqueeze(2)  # (B, T, 1, D)
        return torch.cat([state, lrn], dim=2) if self.state_token else lrn + state

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the formulation's own weights (heads, [LRN]): what the backbone's hidden states are cast to
        when the backbone's weights are held in another (backbone.dtype bfloat16 with LoRA)."""
        return self.lrn.dtype

    def encode(self, images: torch.Tensor, state: torch.Tensor, instructions: list[str]) -> dict[str, torch.Tensor]:
        """images uint8 (B, T, V, h, w, 3), state (B, T, S) -> per-frame inputs of `predict`."""
        state = self.state.normalise(state.float()) if self.state is not None else state.float()
        return {"pixel_values": self.backbone.preprocess_images(images), "state": state.to(self.weight_dtype)}

    @abc.abstractmethod
    def predict(self, encoded: dict[str, torch.Tensor], instructions: list[str],
                generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """The chunk for the last frame (B, L, A): normalised arm, then the gripper's probability of closing.
        `generator`: one for the batch, or (with `batched_rollouts`) a list of B, row b drawing from the b-th."""

    @abc.abstractmethod
    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss on a batch of windows and metrics to log (arm_error, gripper_accuracy, ...)."""

    @torch.no_grad()
    def act(self, images: torch.Tensor, state: torch.Tensor, instructions: list[str],
            generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw actions (B, L, A) for the last frame of each window."""
        predicted = self.predict(self.encode(images, state, instructions), instructions, generator)
        return self.actions.unnormalise(predicted[..., :-1].float(), predicted[..., -1].float())


class ContinuousFormulation(Formulation):
    """A formulation whose `forward(encoded, instructions)` gives every frame a condition state (B, T, W), and
    whose action objective `self.head` turns a condition into a chunk: arm (..., L, A-1) in [-1, 1] and gripper
    logits (..., L)."""

    @classmethod
    def check_settings(cls, history, chunk, options):
        config = super().check_settings(history, chunk, options)
        check_action_objective(config)
        return config

    def action_objective(self, condition_size: int):
        return create_action_objective(self.config, condition_size, self.chunk, self.action_dim)

    def predict(self, encoded, instructions, generator=None):
        condition = self(encoded, instructions)[:, -1]  # (B, W): the backbone, once per observation
        arm, gripper_logits = self.head(condition, generator)  # the objective: one pass or a denoising loop
        return torch.cat([arm, torch.sigmoid(gripper_logits).unsqueeze(-1)], dim=-1)

    def loss(self, batch, generator=None):
        condition = self(self.encode(batch["images"], batch["state"], batch["instruction"]), batch["instruction"])
        target_arm, target_gripper = self.actions.normalise(batch["actions"])
        return self.head.loss(condition, target_arm, target_gripper, batch["action_mask"], generator)


def create_formulation(name: str, backbone: Backbone, action_statistics: Statistics,
                       state_statistics: Statistics | None, **settings) -> Formulation:
    """`create_formulation("policy-head", backbone, store.action_statistics, store.state_statistics,
    history=8, chunk=10, use_state=True, state_input="token", head="lstm")`."""
    formulation_class = FORMULATIONS.get(name)
    with FORMULATIONS.building(name):
        return formulation_class(backbone, action_statistics, state_statistics, **settings)
