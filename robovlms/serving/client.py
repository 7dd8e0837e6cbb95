"""A robot's client of `robovlms serve`: numpy in, numpy out; needs websockets, msgpack and numpy, never torch.

    from robovlms.serving.client import PolicyClient

    with PolicyClient("ws://gpu-host:8000") as policy:
        policy.reset("put the eggplant in the basket", seed=0)
        while not done:
            reply = policy.infer({"rgb_static": image}, state)   # images uint8 (H, W, 3), state (S,)
            for action in reply["execute"]:                    # (k, A): execute these, then observe again
                robot.apply(action)

It is also a `robovlms.benchmark.Policy` (`reset(spec)`, `step(observation)`), so a served policy can be rolled
out on a simulator with robovlms' own benchmarks.
"""

from __future__ import annotations

import contextlib
from typing import Self

import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from robovlms.serving.messages import PROTOCOL, VERSION, PolicyServerError, pack, unpack


class PolicyClient:
    def __init__(self, uri: str = "ws://localhost:8000", open_timeout: float | None = 60):
        """`uri`: ws://HOST:PORT of `robovlms serve`."""
        self.uri = uri
        self._open = contextlib.ExitStack()
        self._connection = self._open.enter_context(connect(uri, max_size=None, compression=None,
                                                            open_timeout=open_timeout))
        self.metadata = unpack(self._connection.recv())
        if self.metadata.get("protocol") != PROTOCOL or self.metadata.get("version") != VERSION:
            self.close()
            raise PolicyServerError(f"{uri} speaks {self.metadata.get('protocol')} version "
                                    f"{self.metadata.get('version')}, not {PROTOCOL} version {VERSION}")
        self._starting: tuple[str, int] | None = None  # the episode that the next observation starts
        self._instruction: str | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._open.close()

    def reset(self, instruction, seed: int = 0) -> None:
        """Start an episode: the next observation is its first (an EpisodeSpec works too, for rollouts)."""
        if not isinstance(instruction, str):  # an EpisodeSpec
            instruction, seed = instruction.instruction, instruction.seed
        self._starting = (instruction, seed)

    def infer(self, images: dict[str, np.ndarray], state: np.ndarray, instruction: str | None = None) -> dict:
        """Send one observation; the reply holds `actions` (L, A), the predicted chunk, and `execute` (k, A),
        what the run executes now. `instruction`: the episode's unless given."""
        if self._starting is None and self._instruction is None:
            raise PolicyServerError("call reset(instruction) before the first observation of an episode")
        message = {"images": images, "state": np.asarray(state, dtype=np.float32)}
        if self._starting is not None:
            self._instruction, seed = self._starting
            message.update(reset=True, seed=int(seed))
            self._starting = None
        message["instruction"] = instruction or self._instruction
        try:
            self._connection.send(pack(message))
            reply = self._connection.recv()
        except ConnectionClosed as closed:
            received = closed.rcvd
            why = f"code {received.code}: {received.reason}" if received is not None else "no close frame"
            limit = (f"; a message may hold at most {self.metadata['max_message_bytes']} bytes"
                     if received is not None and received.code == 1009 else "")
            raise PolicyServerError(f"{self.uri} closed the connection ({why}){limit}") from None
        if isinstance(reply, str):
            raise PolicyServerError(reply)
        return unpack(reply)

    def step(self, observation) -> np.ndarray:
        """robovlms.benchmark.Policy: the actions (k, A) to execute before observing again."""
        return self.infer(observation.images, observation.state, observation.instruction or None)["execute"]
