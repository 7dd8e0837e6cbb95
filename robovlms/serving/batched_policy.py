"""The rollout policy of a trained formulation, stepping many episodes at once: one forward pass for the observations
of every episode that waits, each episode's history, chunks and noise kept apart.

Each observation is encoded once (`Formulation.encode`) and kept while the history needs it; for policy-head the
encoding is the backbone pass, so a step costs one backbone pass whatever H is. Before an episode has H frames
the first one repeats, exactly as training windows are padded. History frames are `frame_stride` env steps apart,
as in training: with `chunk` execution the policy observes every L steps, so a run trained with frame_stride L
sees consecutive observations.

Execution of a predicted chunk of L actions:
    first     the first action only, predicting again at every step (RoboVLMs' CALVIN evaluation)
    ensemble  temporal ensembling (ACT): the action for this step averaged over every chunk that covers it,
              weighted exp(-decay * age), oldest first
    chunk     the whole chunk open-loop; the policy observes again only after its last action

An episode's actions do not depend on the episodes stepped with it: each draws its noise from its own generator,
seeded by its spec, the episodes of one forward pass share their context length (grouped by the instruction's
token count, so no row is padded), and on the CPU the few-row layers are padded to rows the kernels treat alike
(robovlms/serving/batch_invariance.py). A formulation whose class does not itself declare `batched_rollouts` (a
subclass does not inherit it) is stepped one episode at a time.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from robovlms.benchmark import Observation
from robovlms.errors import ConfigError, ShapeError, UnknownNameError
from robovlms.formulation import Formulation
from robovlms.serving.batch_invariance import BatchInvariance

EXECUTIONS = ("first", "ensemble", "chunk")


def check_execution(history: int, chunk: int, frame_stride: int, execution: str) -> None:
    """A policy can observe its history frames `frame_stride` env steps apart only if it observes at least that
    often: `chunk` execution observes every `chunk` steps."""
    if execution not in EXECUTIONS:
        raise UnknownNameError("chunk execution", execution, EXECUTIONS)
    steps_between_observations = chunk if execution == "chunk" else 1
    if history > 1 and frame_stride % steps_between_observations:
        raise ConfigError(f"history frames {frame_stride} env steps apart cannot be observed when each chunk of "
                          f"{chunk} runs open-loop; train with frame_stride {chunk} (or a multiple) for `chunk` "
                          f"execution, or execute with `first` or `ensemble`")


@dataclass
class Episode:
    """One episode's memory: its encoded frames (on the policy's device), the unexecuted rest of each recent chunk,
    its instruction and the generator of its noise."""

    frames: deque
    instruction: str = ""
    generator: torch.Generator = field(default_factory=torch.Generator)
    chunks: list[np.ndarray] = field(default_factory=list)  # oldest first
    last_chunk: np.ndarray | None = None  # the chunk (L, A) predicted at its last step, un-normalised


class BatchedPolicy:
    def __init__(self, formulation: Formulation, cameras: Sequence[str], execution: str = "first",
                 ensemble_decay: float = 0.01, frame_stride: int = 1, autocast_dtype: torch.dtype | None = None):
        """`formulation` on its device, in the dtype its weights are held in; `autocast_dtype`: the dtype its
        forward computes in under mixed precision (None: the weights' own)."""
        check_execution(formulation.history, formulation.chunk, frame_stride, execution)
        self.formulation = formulation.eval()
        self.cameras = list(cameras)
        self.execution = execution
        self.ensemble_decay = ensemble_decay
        self.history = formulation.history
        steps_between_observations = formulation.chunk if execution == "chunk" else 1
        self._every = max(1, frame_stride // steps_between_observations)  # observations between history frames
        weights = next(formulation.parameters(), None) if isinstance(formulation, nn.Module) else None
        self.device = weights.device if weights is not None else torch.device("cpu")
        self.autocast_dtype = autocast_dtype
        self.batched = vars(type(formulation)).get("batched_rollouts", False)  # declared by its own class
        if not self.batched:
            name = getattr(formulation, "name", type(formulation).__name__)
            warnings.warn(f"formulation {name!r} ({type(formulation).__qualname__}) does not set batched_rollouts = "
                          f"True in its class: its episodes are stepped one at a time. Set it once its predict takes "
                          f"a list of generators, one per row, and each row's actions depend on that row alone "
                          f"(robovlms/formulation.py)", stacklevel=2)
        self._invariance = BatchInvariance.of(formulation) if self.device.type == "cpu" and weights is not None \
            else None
        self._context_lengths: dict[str, object] = {}

    def new_episode(self, instruction: str = "", seed: int = 0) -> Episode:
        episode = Episode(frames=deque(maxlen=(self.history - 1) * self._every + 1))
        self.reset(episode, instruction, seed)
        return episode

    def reset(self, episode: Episode, instruction: str, seed: int) -> None:
        episode.frames.clear()
        episode.chunks, episode.last_chunk = [], None
        episode.instruction = instruction
        episode.generator.manual_seed(seed)  # a sampling objective's noise: rerunning an episode reruns it

    @torch.no_grad()
    def step(self, steps: Sequence[tuple[Episode, Observation]]) -> list[np.ndarray]:
        """The action (A,) or chunk (L, A) each episode executes next, in the order of `steps` (one observation
        per episode)."""
        if len({id(episode) for episode, _ in steps}) != len(steps):
            raise ValueError("one observation per episode and step")
        groups: dict[object, list[int]] = {}
        for index, (episode, observation) in enumerate(steps):
            key = self._context_key(observation.instruction or episode.instruction) if self.batched else index
            groups.setdefault(key, []).append(index)
        actions: list[np.ndarray | None] = [None] * len(steps)
        for indices in groups.values():
            for index, action in zip(indices, self._step_together([steps[i] for i in indices])):
                actions[index] = action
        return actions

    def _context_key(self, instruction: str):
        """The instruction's token count, which decides the length of its context (the rest of the layout is the
        same for every episode), or the instruction itself when the formulation has no tokenizer: the rows of one
        forward pass share it, so that none is padded."""
        if instruction not in self._context_lengths:
            tokenizer = getattr(getattr(self.formulation, "backbone", None), "tokenizer", None)
            self._context_lengths[instruction] = instruction if tokenizer is None else \
                len(tokenizer(instruction, add_special_tokens=False)["input_ids"])
        return self._context_lengths[instruction]

    def _step_together(self, steps: Sequence[tuple[Episode, Observation]]) -> list[np.ndarray]:
        episodes = [episode for episode, _ in steps]
        instructions = [observation.instruction or episode.instruction for episode, observation in steps]
        images, state = self._inputs([observation for _, observation in steps])
        with self._computing():
            frame = self.formulation.encode(images, state, instructions)  # each (B, 1, ...)
            for row, episode in enumerate(episodes):
                episode.frames.append({key: value[row:row + 1] for key, value in frame.items()})
            windows = [self._window(episode) for episode in episodes]
            window = {key: torch.cat([w[key] for w in windows]) for key in frame}  # each (B, H, ...)
            generators = [episode.generator for episode in episodes] if self.batched else episodes[0].generator
            predicted = self.formulation.predict(window, instructions, generators).float()  # (B, L, A)
        chunks = self.formulation.actions.unnormalise(predicted[..., :-1], predicted[..., -1]).cpu().numpy()
        return [self._execute(episode, chunk) for episode, chunk in zip(episodes, chunks)]

    def _inputs(self, observations: Sequence[Observation]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images uint8 (B, 1, V, H, W, 3) and state (B, 1, S), on the policy's device."""
        try:
            images = np.stack([np.stack([observation.images[camera] for camera in self.cameras])
                               for observation in observations])
            state = np.stack([np.asarray(observation.state, dtype=np.float32) for observation in observations])
        except KeyError as missing:
            raise ShapeError(f"the observation has no image of camera {missing}; the policy observes "
                             f"{', '.join(self.cameras)}") from None
        except ValueError as error:
            raise ShapeError(f"observations of different shapes cannot be stepped together: {error}") from None
        if images.dtype != np.uint8:
            raise ShapeError(f"images must be uint8 (height, width, 3), got {images.dtype}")
        to_device = {"device": self.device, "non_blocking": True}
        return torch.from_numpy(images)[:, None].to(**to_device), torch.from_numpy(state)[:, None].to(**to_device)

    @contextlib.contextmanager
    def _computing(self):
        with contextlib.ExitStack() as stack:
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
            if self._invariance is not None:
                stack.enter_context(self._invariance)
            yield

    def _window(self, episode: Episode) -> dict[str, torch.Tensor]:
        """The H frames of the episode's window, `_every` observations apart, the first repeated until there are
        enough: each (1, H, ...)."""
        newest = len(episode.frames) - 1
        frames = [episode.frames[max(0, newest - k * self._every)] for k in reversed(range(self.history))]
        return {key: torch.cat([f[key] for f in frames], dim=1) for key in frames[0]}

    def _execute(self, episode: Episode, actions: np.ndarray) -> np.ndarray:
        episode.last_chunk = actions
        if self.execution == "chunk":
            return actions
        if self.execution == "first":
            return actions[0]
        episode.chunks.append(actions)
        covering = np.stack([chunk[0] for chunk in episode.chunks])  # this step's action of every chunk, oldest first
        weights = np.exp(-self.ensemble_decay * np.arange(len(covering)))
        action = (weights[:, None] * covering).sum(0) / weights.sum()
        action[-1] = 1.0 if action[-1] > 0 else -1.0
        episode.chunks = [chunk[1:] for chunk in episode.chunks if len(chunk) > 1]
        return action.astype(np.float32)


class EpisodePolicy:
    """A batched policy stepping one episode: the `Policy` of robovlms.benchmark, in this process."""

    def __init__(self, batched: BatchedPolicy):
        self.batched, self.formulation = batched, batched.formulation
        self._episode = batched.new_episode()

    def reset(self, spec) -> None:
        self.batched.reset(self._episode, spec.instruction, spec.seed)

    def step(self, observation: Observation) -> np.ndarray:
        return self.batched.step([(self._episode, observation)])[0]
