"""The policy server of an evaluation: the process that runs `robovlms.rollout` holds the policy on its device, and
its simulator workers send it observations and receive actions.

A thread of that process serves every worker: it waits for the requests of all of them, takes every request that
is waiting, steps those episodes in one batch (`BatchedPolicy.step`: one forward pass when they share a context
length) and answers each. Each worker runs one episode at a time, so its connection is its episode: `reset` starts
it (instruction and seed), `step` sends an observation (the cameras the policy observes, the state and the
instruction) and waits for the action or chunk; a worker that goes away takes its episode with it.

Connections are `multiprocessing.connection`'s, on a Unix socket of this machine, authenticated with a random key
that only the workers are given. A worker needs neither torch nor the model: a served evaluation holds one copy of
the policy, not one per worker. An error in the policy's step is sent to the workers of that batch, which raise it
as a PolicyServerError with the server's traceback.
"""

from __future__ import annotations

import functools
import secrets
import threading
import traceback
from multiprocessing import Pipe
from multiprocessing.connection import Client, Connection, Listener, wait
from typing import Self

import numpy as np

from robovlms.benchmark import EpisodeSpec, Observation
from robovlms.serving.messages import PolicyServerError


class PolicyServer:
    """Serves `policy` (a robovlms.serving.batched_policy.BatchedPolicy) to the workers of an evaluation, from a
    thread of this process: `with PolicyServer(policy) as server: evaluate(..., server.client_factory(), ...)`."""

    def __init__(self, policy):
        self.policy = policy
        self.batches = 0  # batched steps served, and the episode steps in them
        self.steps = 0
        self.open_episodes = 0  # workers connected, each holding an episode
        self._authkey = secrets.token_bytes(32)
        self._listener = Listener(family="AF_UNIX", authkey=self._authkey)
        self._wake_reader, self._wake_writer = Pipe(duplex=False)
        self._accepted: list[Connection] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._threads = [threading.Thread(target=self._accept, name="policy-server-accept", daemon=True),
                         threading.Thread(target=self._serve, name="policy-server", daemon=True)]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def client_factory(self) -> functools.partial:
        """A picklable zero-argument factory of the workers' policy: a ServedPolicy connected to this server."""
        return functools.partial(ServedPolicy, self._listener.address, self._authkey)

    def close(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake_writer.send_bytes(b"stop")
        try:  # accept() blocks until a client comes: be that client
            Client(self._listener.address, authkey=self._authkey).close()
        except OSError:
            pass
        for thread in self._threads:
            if thread.ident is not None:
                thread.join()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                connection = self._listener.accept()
            except OSError:  # a client that failed the handshake, or the listener closed
                continue
            if self._stopping:
                connection.close()
                return
            connection.send(("cameras", list(self.policy.cameras)))
            with self._lock:
                self._accepted.append(connection)
            self._wake_writer.send_bytes(b"accepted")

    def _serve(self) -> None:
        episodes: dict[Connection, object] = {}
        while True:
            ready = wait([self._wake_reader, *episodes])
            if self._wake_reader in ready:
                if self._wake_reader.recv_bytes() == b"stop":
                    break
                with self._lock:
                    episodes.update((connection, self.policy.new_episode()) for connection in self._accepted)
                    self._accepted.clear()
            steps = []
            for connection in ready:
                if connection is self._wake_reader:
                    continue
                try:
                    request = connection.recv()
                except (EOFError, OSError):  # the worker went away: so does its episode
                    del episodes[connection]
                    connection.close()
                    continue
                if request[0] == "reset":
                    self.policy.reset(episodes[connection], *request[1:])
                else:
                    _, images, state, instruction = request
                    steps.append((connection, Observation(images=images, state=state, instruction=instruction)))
            if steps:
                self._answer(steps, episodes)
            self.open_episodes = len(episodes)
        for connection in episodes:
            connection.close()

    def _answer(self, steps: list[tuple[Connection, Observation]], episodes: dict) -> None:
        try:
            actions = [("action", action) for action in
                       self.policy.step([(episodes[connection], observation) for connection, observation in steps])]
        except Exception:  # noqa: BLE001 - sent to the workers, which raise it
            actions = [("error", traceback.format_exc())] * len(steps)
        self.batches, self.steps = self.batches + 1, self.steps + len(steps)
        for (connection, _), answer in zip(steps, actions):
            try:
                connection.send(answer)
            except OSError:
                pass  # the worker went away; its connection is dropped at the next wait


class ServedPolicy:
    """The policy of a simulator worker: each step asks the evaluation's policy server (robovlms.benchmark's
    Policy protocol)."""

    def __init__(self, address: str, authkey: bytes):
        self._connection = Client(address, authkey=authkey)
        _, self._cameras = self._connection.recv()

    def reset(self, spec: EpisodeSpec) -> None:
        self._connection.send(("reset", spec.instruction, spec.seed))

    def step(self, observation: Observation) -> np.ndarray:
        images = {camera: observation.images[camera] for camera in self._cameras if camera in observation.images}
        self._connection.send(("step", images, observation.state, observation.instruction))
        kind, answer = self._connection.recv()
        if kind == "error":
            raise PolicyServerError(f"the policy server failed on this step:\n{answer}")
        return answer
