"""A rollout policy from a trained run directory: it keeps the observation history, asks the formulation for the
next chunk, un-normalises it and executes it as the run's `execution` setting says.

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
"""

from __future__ import annotations

import functools
from collections import deque
from pathlib import Path

import numpy as np
import torch

from robovlms.benchmark import EpisodeSpec, Observation
from robovlms.errors import ConfigError, UnknownNameError
from robovlms.formulation import Formulation

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


class CheckpointPolicy:
    def __init__(self, formulation: Formulation, cameras: list[str], execution: str = "first",
                 ensemble_decay: float = 0.01, frame_stride: int = 1):
        if execution not in EXECUTIONS:
            raise UnknownNameError("chunk execution", execution, EXECUTIONS)
        self.formulation = formulation.eval()
        self.cameras = list(cameras)
        self.execution = execution
        self.ensemble_decay = ensemble_decay
        self.history = formulation.history
        check_execution(self.history, formulation.chunk, frame_stride, execution)
        steps_between_observations = formulation.chunk if execution == "chunk" else 1
        self._every = max(1, frame_stride // steps_between_observations)  # observations between history frames
        self._frames: deque[dict[str, torch.Tensor]] = deque(maxlen=(self.history - 1) * self._every + 1)
        self._chunks: list[np.ndarray] = []  # the unexecuted rest of each recent chunk, oldest first
        self._instruction = ""
        self._generator = torch.Generator()

    def reset(self, spec: EpisodeSpec) -> None:
        self._frames.clear()
        self._chunks = []
        self._instruction = spec.instruction
        self._generator.manual_seed(spec.seed)  # a sampling objective's noise: rerunning an episode reruns it

    @torch.no_grad()
    def step(self, observation: Observation) -> np.ndarray:
        instructions = [observation.instruction or self._instruction]
        images = torch.from_numpy(np.stack([observation.images[camera] for camera in self.cameras]))
        state = torch.from_numpy(np.asarray(observation.state, dtype=np.float32))
        frame = self.formulation.encode(images[None, None], state[None, None], instructions)  # each (1, 1, ...)
        self._frames.append(frame)
        newest = len(self._frames) - 1
        frames = [self._frames[max(0, newest - k * self._every)] for k in reversed(range(self.history))]
        window = {key: torch.cat([f[key] for f in frames], dim=1) for key in frame}
        predicted = self.formulation.predict(window, instructions, self._generator)[0].float()  # (L, A)
        actions = self.formulation.actions.unnormalise(predicted[:, :-1], predicted[:, -1]).numpy()
        if self.execution == "chunk":
            return actions
        if self.execution == "first":
            return actions[0]
        self._chunks.append(actions)
        covering = np.stack([chunk[0] for chunk in self._chunks])  # this step's action of every chunk, oldest first
        weights = np.exp(-self.ensemble_decay * np.arange(len(covering)))
        action = (weights[:, None] * covering).sum(0) / weights.sum()
        action[-1] = 1.0 if action[-1] > 0 else -1.0
        self._chunks = [chunk[1:] for chunk in self._chunks if len(chunk) > 1]
        return action.astype(np.float32)


def load_policy(run_dir: str | Path, execution: str | None = None, checkpoint: str | None = None
                ) -> CheckpointPolicy:
    """The policy of a trained run directory; `execution` overrides the run's own setting."""
    from robovlms.training import LAST_CHECKPOINT, load_formulation

    formulation, config = load_formulation(run_dir, checkpoint or LAST_CHECKPOINT)
    return CheckpointPolicy(formulation, config.cameras, execution or config.execution,
                            frame_stride=config.frame_stride)


def policy_factory(run_dir: str | Path, execution: str | None = None, checkpoint: str | None = None):
    """A picklable zero-argument factory for `robovlms.rollout.evaluate`: each worker loads its own copy."""
    return functools.partial(load_policy, str(run_dir), execution, checkpoint)


def policy_digest(run_dir: str | Path, checkpoint: str | None = None) -> str:
    """What identifies a trained run's policy wherever the run lies: a SHA-256 over its config (less the paths of
    its store and run directory), action statistics, backbone files and checkpoint."""
    import hashlib
    import json

    from robovlms.training import (BACKBONE_DIR, CHECKPOINT_DIR, CONFIG_FILE, LAST_CHECKPOINT, STATISTICS_FILE,
                                   load_config)

    run_dir = Path(run_dir)
    config = load_config(run_dir / CONFIG_FILE).model_dump(mode="json", exclude={"store", "run_dir"})
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    backbone_files = sorted(path for path in (run_dir / BACKBONE_DIR).rglob("*") if path.is_file())
    checkpoint_file = run_dir / CHECKPOINT_DIR / (checkpoint or LAST_CHECKPOINT)
    for path in [run_dir / STATISTICS_FILE, *backbone_files, checkpoint_file]:
        digest.update(path.relative_to(run_dir).as_posix().encode())
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"
