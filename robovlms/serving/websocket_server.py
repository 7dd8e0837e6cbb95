"""`robovlms serve`: a trained run's policy over a websocket, one connection per robot.

The conventions are openpi's (`scripts/serve_policy.py`, `openpi_client.websocket_client_policy`): a websocket
server sends its metadata first, then answers each msgpack observation with a msgpack map holding `actions`; an
error comes back as a text frame; GET /healthz answers 200. Message format: robovlms/serving/messages.py.

Unlike openpi's server, each connection is an episode with its own history, chunk ensemble and noise generator
(the run's policy may look at H frames), started by an observation with `reset: true`; connections are served
together, the steps that wait batched into one forward pass (`BatchedPolicy.step`, in a thread so that the event
loop keeps reading). A message that is not an observation gets an error reply and the connection stays open; one
over `max_message_bytes` is refused by the websocket layer before it is read, which closes that connection with
code 1009 (message too big); either way the server serves on. A connection that closes takes its episode with it.
"""

from __future__ import annotations

import asyncio
import http
import logging
import threading
import time

import numpy as np
import websockets
from websockets.asyncio.server import ServerConnection, serve

from robovlms.serving.messages import PROTOCOL, VERSION, MessageError, pack, read_observation

logger = logging.getLogger(__name__)
DEFAULT_MAX_MESSAGE_BYTES = 32 * 2 ** 20


class WebsocketPolicyServer:
    def __init__(self, policy, image_size: int, state_dim: int | None, host: str = "0.0.0.0", port: int = 8000,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, metadata: dict | None = None):
        """`policy`: a robovlms.serving.batched_policy.BatchedPolicy; `image_size`, `state_dim`: what observations
        must hold (images of other sizes are resized); `metadata`: more to tell each client."""
        self.policy = policy
        self.image_size, self.state_dim = image_size, state_dim
        self.host, self.port = host, port
        self.max_message_bytes = max_message_bytes
        formulation = policy.formulation
        self.metadata = {"protocol": PROTOCOL, "version": VERSION, "cameras": policy.cameras,
                         "image_size": image_size, "state_dim": state_dim, "action_dim": formulation.action_dim,
                         "chunk": formulation.chunk, "history": formulation.history, "execution": policy.execution,
                         "device": str(policy.device), "max_message_bytes": max_message_bytes, **(metadata or {})}
        self.episodes = 0  # connections open, each holding an episode
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def serve_forever(self) -> None:
        """Serve until `stop()` (from another thread) or Ctrl-C."""
        asyncio.run(self._serve())

    def wait_until_serving(self, timeout: float | None = None) -> bool:
        """Block until the port is open (`self.port` is then the bound one, when 0 was asked for)."""
        return self._ready.wait(timeout)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._requests: asyncio.Queue = asyncio.Queue()
        batcher = asyncio.create_task(self._batch_steps())
        async with serve(self._handle, self.host, self.port, max_size=self.max_message_bytes, compression=None,
                         process_request=_health_check) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
        batcher.cancel()

    async def _batch_steps(self) -> None:
        """Step every observation that waits together, in a thread; answer each through its future."""
        while True:
            waiting = [await self._requests.get()]
            while not self._requests.empty():
                waiting.append(self._requests.get_nowait())
            started = time.perf_counter()
            try:
                actions = await asyncio.to_thread(self.policy.step, [(episode, obs) for episode, obs, _ in waiting])
            except Exception as error:  # noqa: BLE001 - answered to every client of the batch
                for _, _, answer in waiting:
                    answer.set_exception(error)
                continue
            milliseconds = (time.perf_counter() - started) * 1000
            for (episode, _, answer), action in zip(waiting, actions):
                answer.set_result((episode.last_chunk, np.atleast_2d(action), milliseconds))

    async def _handle(self, connection: ServerConnection) -> None:
        episode = self.policy.new_episode()
        self.episodes += 1
        logger.info("connection from %s opened", connection.remote_address)
        try:
            await connection.send(pack(self.metadata))
            async for message in connection:
                try:
                    observation, reset, seed = read_observation(message, self.policy.cameras, self.image_size,
                                                                self.state_dim)
                except MessageError as error:
                    await connection.send(f"error: {error}")
                    continue
                if reset:
                    self.policy.reset(episode, observation.instruction, seed)
                answer = self._loop.create_future()
                await self._requests.put((episode, observation, answer))
                try:
                    chunk, execute, milliseconds = await answer
                except Exception as error:  # noqa: BLE001 - the policy's error, told to the client
                    await connection.send(f"error: the policy failed on this observation: "
                                          f"{type(error).__name__}: {error}")
                    continue
                await connection.send(pack({"actions": chunk.astype(np.float32), "execute": execute.astype(np.float32),
                                            "server_timing": {"infer_ms": milliseconds}}))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.episodes -= 1
            logger.info("connection from %s closed", connection.remote_address)


def _health_check(connection: ServerConnection, request):
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None
